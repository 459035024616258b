"""End-to-end CLI runs on tiny real models: generate -> rank -> correlate, with values checked."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from teacherfit import metrics
from teacherfit.cli import app
from teacherfit.data import load_records, tokenize_example
from tiny import save_tiny, tiny_llama, tiny_qwen2, tiny_reward_model

runner = CliRunner()

INSTRUCTIONS = [
    {"instruction": "Write a short poem about the sea."},
    {"instruction": "List three colours.", "input": "Use commas."},
    {"instruction": "What is the capital of France?"},
    {"instruction": "Explain how a neural network learns."},
    {"instruction": "def add(a, b):"},
    {"instruction": "Translate good morning into French."},
]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("e2e")
    teachers = {
        "alpha": save_tiny(tiny_llama(tokenizer, seed=1), tokenizer, root / "alpha"),
        "beta": save_tiny(tiny_qwen2(tokenizer, seed=2), tokenizer, root / "beta"),
        "gamma": save_tiny(tiny_llama(tokenizer, seed=3, layers=1), tokenizer, root / "gamma"),
    }
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    rm = tiny_reward_model(tokenizer)
    rm_dir = save_tiny(rm, tokenizer, root / "rm")
    instr = root / "instructions.jsonl"
    instr.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTIONS))
    return root, teachers, student, rm_dir, instr


@pytest.fixture(scope="module")
def generated(workspace):
    root, teachers, _, _, instr = workspace
    args = ["generate", "--instructions", instr, "--out", root / "gen", "--set", "decoding.max_new_tokens=6"]
    for name, path in teachers.items():
        args += ["--teacher", f"{name}={path}"]
    invoke(*args)
    return root / "gen"


def test_generate_writes_one_row_per_instruction_with_provenance(generated, workspace):
    _, teachers, _, _, instr = workspace
    ids = [r.id for r in load_records(instr).records]
    for name in teachers:
        rep = load_records(generated / "responses" / f"{name}.jsonl", require_response=True)
        assert [r.id for r in rep.records] == ids  # instruction order, one each
        for r in rep.records:
            assert r.meta["teacher"]["name"] == name
            assert r.meta["teacher"]["sha256"]  # folder digest recorded
            assert r.meta["decoding"]["max_new_tokens"] == 6 and r.meta["seed"] == 0
            assert 1 <= r.meta["completion_tokens"] <= 6 and r.meta["finish_reason"] in ("stop", "length")
    summary = json.loads((generated / "summary.json").read_text())
    assert [t["generated_now"] for t in summary["teachers"]] == [6, 6, 6]
    assert (generated / "config.resolved.yaml").exists()


@pytest.fixture(scope="module")
def ranked(generated, workspace):
    root, teachers, student, rm_dir, _ = workspace
    invoke("rank", "--generate-run", generated, "--student", student, "--out", root / "rank",
           "--set", f"reference_lm={teachers['alpha']}", "--set", "reward.kind=classifier",
           "--set", f"reward.model={rm_dir}", "--set", "bootstrap=200", "--beta", "0.5")
    return root / "rank"


def test_rank_values_match_references(ranked, workspace, tokenizer):
    from transformers import AutoModelForCausalLM

    _, _, student_dir, _, _ = workspace
    results = json.loads((ranked / "results.json").read_text())
    samples = pq.read_table(ranked / "per_sample.parquet").to_pylist()
    assert len(samples) == 18 and results["n_instructions"] == 6
    # per-sample compatibility loss == naive NLL of the response under the student
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    recs = {r.id: r for r in load_records(ranked.parent / "gen" / "responses" / "beta.jsonl").records}
    def naive_nll(ids: list[int], scored_from: int) -> list[float]:
        """-log p(ids[t] | ids[:t]) for t >= scored_from, from the model's full logits."""
        with torch.no_grad():
            logp = torch.log_softmax(student(torch.tensor([ids])).logits[0].double(), -1)
        return [-float(logp[t - 1, ids[t]]) for t in range(scored_from, len(ids))]

    for s in [s for s in samples if s["teacher"] == "beta"][:3]:
        ex = tokenize_example(tokenizer, recs[s["id"]].messages)
        nll = [x for x, label in zip(naive_nll(ex.input_ids, 1), ex.labels[1:]) if label != -100]
        assert s["loss_student"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
        assert s["ppl_student"] == pytest.approx(math.exp(s["loss_student"]), rel=1e-6)
        # IFD: the same response tokens (content and the template's end of turn) scored after one start token
        # (EOS: the tiny tokenizer has no BOS) instead of after the instruction; every one of them is scored
        response = [t for t in ex.labels if t != -100]
        alone = naive_nll([tokenizer.eos_token_id] + response, 1)
        assert len(alone) == len(nll)
        assert s["loss_student_uncond"] == pytest.approx(sum(alone) / len(alone), rel=1e-5)
        assert s["ifd_student"] == pytest.approx(math.exp(sum(nll) / len(nll) - sum(alone) / len(alone)), rel=1e-5)
    # per-teacher CAR from the per-sample means, with the variant the rewards call for
    rows = {t["teacher"]: t for t in results["teachers"]}
    means_r = {n: np.mean([s["reward"] for s in samples if s["teacher"] == n]) for n in rows}
    means_l = {n: np.mean([s["loss_student"] for s in samples if s["teacher"] == n]) for n in rows}
    names = list(rows)
    expected_variant = metrics.car_variant_for([means_r[n] for n in names])
    assert results["car_variant"] == expected_variant
    if expected_variant == "plain":
        expected = {n: means_r[n] / (1 + 0.5 * means_l[n]) for n in names}
    else:
        pos = metrics.positive_rewards([means_r[n] for n in names])
        expected = {n: p / (1 + 0.5 * means_l[n]) for n, p in zip(names, pos)}
    for n in names:
        assert rows[n]["car"] == pytest.approx(expected[n], rel=1e-9)
        assert rows[n]["reward"] == pytest.approx(means_r[n], rel=1e-9)
        assert rows[n]["car_low"] <= rows[n]["car"] + 1e-9 or math.isnan(rows[n]["car_low"])
    # sorted by CAR, best first
    cars = [t["car"] for t in results["teachers"]]
    assert cars == sorted(cars, reverse=True)
    html = (ranked / "report.html").read_text()
    assert "CAR variant" in html and "data:image/png;base64," in html and "http://" not in html


def test_rank_rerun_uses_cached_stages(ranked, workspace):
    """A second rank with another beta reuses the cached scores (no model needed) and changes only CAR."""
    root, teachers, student, rm_dir, _ = workspace
    before = json.loads((ranked / "results.json").read_text())
    invoke("rank", "--generate-run", root / "gen", "--student", student, "--out", ranked,
           "--set", f"reference_lm={teachers['alpha']}", "--set", "reward.kind=classifier",
           "--set", f"reward.model={rm_dir}", "--set", "bootstrap=0", "--beta", "0")
    after = json.loads((ranked / "results.json").read_text())
    by_name = {t["teacher"]: t for t in before["teachers"]}
    for t in after["teachers"]:
        assert t["loss_student"] == pytest.approx(by_name[t["teacher"]]["loss_student"])
        if after["car_variant"] == "plain":
            assert t["car"] == pytest.approx(t["reward"])  # beta = 0: CAR is the reward


def test_rank_dry_run_prints_the_plan_and_a_typo_fails_at_once(generated, workspace, tmp_path):
    _, _, student, rm_dir, _ = workspace
    args = ["rank", "--generate-run", generated, "--student", student, "--out", tmp_path / "dry", "--dry-run",
            "--set", "reference_lm=null", "--set", "reward.kind=classifier"]
    result = invoke(*args, "--set", f"reward.model={rm_dir}")
    output = " ".join(result.output.split())
    assert "rank --dry-run (nothing loaded): 3 teachers x 6 instructions" in output
    assert "student (" in output and "reward (" in output and "18 rows, 0 cached, 18 to score" in output
    assert not (tmp_path / "dry").exists()
    typo = runner.invoke(app, [str(a) for a in args] + ["--set", "reward.model=qwen2.5-coder-1.5b-instruc"])
    assert typo.exit_code == 2
    assert "did you mean the packaged model 'qwen2.5-coder-1.5b-instruct'" in typo.output.replace("\n", "")


def test_correlate_against_hand_computed(ranked, tmp_path):
    results = json.loads((ranked / "results.json").read_text())
    names = [t["teacher"] for t in results["teachers"]]
    outcomes = {n: float(i) for i, n in enumerate(names)}  # names are best-CAR first: the worst-CAR teacher did best
    path = tmp_path / "outcomes.json"
    path.write_text(json.dumps(outcomes))
    invoke("correlate", "--rank-run", ranked, "--outcomes", path, "--out", tmp_path / "corr", "--set", "bootstrap=100")
    corr = json.loads((tmp_path / "corr" / "correlations.json").read_text())
    rows = {r["metric"]: r for r in corr["correlations"]}
    y = [outcomes[t["teacher"]] for t in results["teachers"]]
    car = [t["car"] for t in results["teachers"]]
    assert rows["car"]["spearman"] == pytest.approx(metrics.spearman(car, y))
    assert rows["car"]["spearman"] == pytest.approx(-1.0)  # ranked exactly backwards
    # lower-is-better metrics are negated before correlating
    loss = [-t["loss_student"] for t in results["teachers"]]
    assert rows["loss_student"]["spearman"] == pytest.approx(metrics.spearman(loss, y))
    assert "beta_calibration" in corr and (tmp_path / "corr" / "report.html").exists()


def test_bad_config_field_is_named(tmp_path):
    cfg = tmp_path / "rank.yaml"
    cfg.write_text("student: x\nbeta: -1\n")
    result = runner.invoke(app, ["rank", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "field `beta`" in result.output and "greater than or equal to 0" in result.output


def test_malformed_row_is_reported_with_file_and_line(tmp_path, workspace):
    _, teachers, _, _, _ = workspace
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": "fine"}\n{"oops": 1}\n')
    result = runner.invoke(app, ["generate", "--instructions", str(bad), "--teacher", f"a={teachers['alpha']}",
                                 "--out", str(tmp_path / "g")])
    assert result.exit_code == 2
    assert f"{bad}:3" in result.output.replace("\n", "")
    ok = runner.invoke(app, ["generate", "--instructions", str(bad), "--teacher", f"a={teachers['alpha']}",
                             "--out", str(tmp_path / "g"), "--set", "on_error=skip", "--set", "decoding.max_new_tokens=2"])
    assert ok.exit_code == 0, ok.output
    assert "1 malformed" in ok.output
    assert len(load_records(tmp_path / "g" / "responses" / "a.jsonl").records) == 2


def test_best_of_n_keeps_the_candidate_with_the_highest_reward(workspace, tmp_path):
    root, teachers, _, rm_dir, instr = workspace
    cfg = tmp_path / "bon.yaml"
    cfg.write_text(
        f"instructions: {instr}\n"
        f"teachers: [{{name: a, model: {teachers['alpha']}}}]\n"
        "decoding: {max_new_tokens: 5, temperature: 1.0, n: 3, seed: 3}\n"
        f"best_of_n_reward: {{kind: classifier, model: {rm_dir}}}\n"
    )
    invoke("generate", "--config", cfg, "--out", tmp_path / "bon")
    rows = load_records(tmp_path / "bon" / "responses" / "a.jsonl").records
    assert len(rows) == len(INSTRUCTIONS)
    for r in rows:
        cands = r.meta["best_of_n"]
        assert len(cands) == 3
        best = max(cands, key=lambda c: c["reward"])
        assert r.response == best["text"]


def test_rank_says_which_teacher_to_use_and_fits_80_columns(ranked, workspace):
    """The recommendation is the paired bootstrap's (recomputed here from the per-sample rows), the terminal
    table shows every teacher's full name at 80 columns, and the next commands are runnable as printed."""
    from rich.console import Console

    from teacherfit.pipelines.rank import print_ranking

    results = json.loads((ranked / "results.json").read_text())
    samples = pq.read_table(ranked / "per_sample.parquet").to_pylist()
    pick = results["recommendation"]
    names = [t["teacher"] for t in results["teachers"]]
    ids = sorted({s["id"] for s in samples})
    grid = {(s["teacher"], s["id"]): s for s in samples}
    rewards = np.array([[grid[n, i]["reward"] for i in ids] for n in names])
    losses = np.array([[grid[n, i]["loss_student"] for i in ids] for n in names])
    transform = (lambda x: x) if results["car_variant"] == "plain" else metrics.positive_reward_map(rewards.mean(1))
    want = metrics.car_pick_probabilities(rewards, losses, results["beta"], transform=transform, n_resamples=200, seed=0)
    assert pick["teacher"] == names[want["leader"]] == names[0] and pick["runner_up"] == names[want["runner_up"]]
    assert pick["p_beats_runner_up"] == pytest.approx(want["p_leader_beats_runner_up"])
    assert pick["supported"] == (pick["p_beats_runner_up"] >= 0.95)
    assert [t["p_best"] for t in results["teachers"]] == pytest.approx(want["p_best"])
    assert pick["beta_is_default"] is False  # --beta 0.5 was given: no placeholder warning
    assert not any("uncalibrated" in n for n in results["notes"])
    assert pick["next"][0].startswith(f"teacherfit distill --student {workspace[2]} --responses {names[0]}=")
    assert any("data.best_of_rank=" in c for c in pick["next"])

    console = Console(width=80, record=True, force_terminal=False)
    print_ranking(results, ranked, out=console)
    text = console.export_text()
    commands = [line for line in text.splitlines() if line.startswith("  teacherfit ")]
    assert len(commands) == len(pick["next"])  # each on one line, whole, to copy (the only lines past 80)
    assert max(len(line) for line in text.splitlines() if line not in commands) <= 80
    table = text.split("pick:" if pick["supported"] else "no pick:")[0]
    for name in names:
        assert name in table  # whole, not "gam…"
    assert "…" not in table and "P(best)" in table
    assert ("pick: use " if pick["supported"] else "no pick: no pick is supported") in " ".join(text.split())


def test_rank_report_leads_with_the_pick_and_shows_the_texts(ranked):
    html = (ranked / "report.html").read_text()
    results = json.loads((ranked / "results.json").read_text())
    verdict = html.index('class="verdict')
    assert verdict < html.index("Teachers, best CAR first") < html.index("Per-sample scores") < html.index("Provenance")
    assert results["recommendation"]["teacher"] in html[verdict: verdict + 400]
    assert "Write a short poem about the sea." in html  # instruction text, escaped, beside each response
    assert "teacherfit distill --student" in html
    assert "{&quot;" not in html and '{"model"' not in html  # provenance as a table, not raw JSON
