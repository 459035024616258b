"""`teacherfit study` end to end on tiny models: every stage, the correlations recomputed from what the run
recorded, a second run that skips every stage, and an interrupted evaluation that resumes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from teacherfit import metrics
from teacherfit.cli import app
from teacherfit.config import ConfigError, StudyConfig, load_config
import numpy as np

from teacherfit.data import Record
from test_evaluate import scripted_judge
from test_rewards import scripted_server
from tiny import CORPUS, save_tiny, tiny_llama, tiny_qwen2, tiny_reward_model

runner = CliRunner()

INSTRUCTIONS = ["Write a short poem about the sea.", "List three colours.", "What is the capital of France?",
                "Explain how a neural network learns.", "def add(a, b):", "Translate good morning into French.",
                "Name a colour of the sky.", "Say something about a fox."]
FILE_TEACHERS = {  # response style per file teacher: distinct lengths and content
    "long": lambda i: " ".join(CORPUS[i % 8: i % 8 + 3]),
    "short": lambda i: CORPUS[(i + 3) % 8].split(".")[0] + ".",
    "numbers": lambda i: "Sure! Here is an answer with numbers 0123456789." * (1 + i % 2),
}
METRICS = ["car", "reward", "length", "loss_student", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref", "grape", "grace",
           "reward_2", "car_2"]
ARMS = ["long@seed1", "mix-car", "mix-grape"]  # the seed repeat and the two mixtures, beside the teachers


@pytest.fixture(scope="module")
def study_workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("study")
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    teacher = save_tiny(tiny_qwen2(tokenizer, seed=2), tokenizer, root / "teacher")
    rm = tiny_reward_model(tokenizer)
    rm_dir = save_tiny(rm, tokenizer, root / "rm")
    rm2_dir = save_tiny(tiny_reward_model(tokenizer, seed=7), tokenizer, root / "rm2")
    (root / "instructions.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in INSTRUCTIONS))
    for name, answer in FILE_TEACHERS.items():
        rows = [Record.from_messages([{"role": "user", "content": t}]).with_response(answer(i)).to_row()
                for i, t in enumerate(INSTRUCTIONS)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "instructions": "instructions.jsonl",
        "heldout": 3,
        "student": str(student),
        "teachers": [
            *({"name": n, "backend": "file", "responses": f"{n}.jsonl"} for n in FILE_TEACHERS),
            # one model, two decoding settings: two teachers
            {"name": "qwen-greedy", "model": str(teacher), "decoding": {"max_new_tokens": 8}},
            {"name": "qwen-sampled", "model": str(teacher), "decoding": {"max_new_tokens": 8, "temperature": 1.0, "seed": 3}},
        ],
        "pairs": [{"family": "file", "larger": "long", "smaller": "short"}],
        "seed_repeats": ["long"],
        "mixtures": ["car", "grape"],
        "rank": {"reference_lm": str(teacher), "reward": {"kind": "classifier", "model": str(rm_dir)},
                 "reward_2": {"kind": "classifier", "model": str(rm2_dir)}, "max_length": 96,
                 "bootstrap": 50},
        "finetune": {"train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0,
                               "max_length": 64, "checkpoint_every": 1}},
        "evaluate": {"mtbench": {"enabled": False},
                     "pairwise": {"reference": {"name": "ref", "backend": "file", "responses": "long.jsonl"}},
                     "reward": {"kind": "classifier", "model": str(rm_dir)}, "decoding": {"max_new_tokens": 6},
                     "max_length": 96, "bootstrap": 50},
        "outcome": "heldout_loss",
        "bootstrap": 200,
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return root, path


def _judge_url(base_url: str) -> str:
    return f"evaluate.judge={{backend: openai, remote: {{base_url: '{base_url}', model: fake, max_retries: 0}}}}"


@pytest.fixture(scope="module")
def judge_server():
    """One scripted judge for the module: its URL is part of the judge's identity, so re-runs must see the same."""
    with scripted_server(scripted_judge) as (base_url, seen):
        yield base_url, seen


@pytest.fixture(scope="module")
def studied(study_workspace, judge_server):
    root, path = study_workspace
    base_url, seen = judge_server
    out = root / "run"
    result = runner.invoke(app, ["study", "-c", str(path), "--out", str(out), "--set", _judge_url(base_url)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    first = len(seen)
    # the same command again: every stage is skipped, nothing generated, trained or judged
    again = runner.invoke(app, ["study", "-c", str(path), "--out", str(out), "--set", _judge_url(base_url)])
    assert again.exit_code == 0, again.output + repr(again.exception)
    second = len(seen) - first
    return out, first, second, base_url


def test_study_runs_every_stage_in_its_own_directory(studied):
    out, requests, _, _ = studied
    results = json.loads((out / "results.json").read_text())
    names = ["long", "short", "numbers", "qwen-greedy", "qwen-sampled"]
    assert [t["teacher"] for t in results["teachers"]] == names
    assert results["instructions"]["n_train"] == 5 and results["instructions"]["n_heldout"] == 3
    for name in names + ARMS:
        assert (out / "finetune" / name / "model" / "config.json").exists()
        assert not (out / "finetune" / name / "checkpoints").exists()  # dropped once the stage was done
        summary = json.loads((out / "finetune" / name / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["teacher"] is None  # sequence-level KD: no teacher model
        assert (out / "evaluate" / name / "results.json").exists()
    # the fine-tunes trained on the teachers' answers to the training split only
    held = {json.loads(line)["id"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()}
    for name in names:
        ids = {json.loads(line)["id"] for line in (out / "generate" / "responses" / f"{name}.jsonl").read_text().splitlines()}
        assert len(ids) == 5 and not ids & held
    sampled = [json.loads(line) for line in (out / "generate/responses/qwen-sampled.jsonl").read_text().splitlines()]
    assert all(r["decoding"]["temperature"] == 1.0 for r in sampled)
    # evaluated on the held-out instructions: 9 students (5 teachers, 3 arms, the untuned one) x 3 items x 2 orders
    assert requests == 9 * 3 * 2
    assert results["baseline"] is not None and math.isfinite(results["baseline"]["heldout_loss"])
    assert set(results["stages"]) == {"generate", "rank", *(f"finetune {n}" for n in names + ARMS),
                                      *(f"evaluate {n}" for n in names + ARMS + ["base"])}


def test_study_correlations_are_recomputable_from_recorded_values(studied):
    out, _, _, _ = studied
    results = json.loads((out / "results.json").read_text())
    rank = {t["teacher"]: t for t in json.loads((out / "rank" / "results.json").read_text())["teachers"]}
    names = [t["teacher"] for t in results["teachers"]]
    # the outcome: the negated held-out loss each evaluation recorded
    outcome = [-json.loads((out / "evaluate" / n / "results.json").read_text())["heldout_loss"]["mean"] for n in names]
    assert [t["outcome"] for t in results["teachers"]] == pytest.approx(outcome)
    rows = {r["metric"]: r for r in results["correlations"]["correlations"]}
    assert set(rows) == set(METRICS)
    for m in METRICS:
        x = [metrics.METRIC_DIRECTION[m] * rank[n][m] for n in names]
        assert rows[m]["spearman"] == pytest.approx(metrics.spearman(x, outcome), nan_ok=True)
        assert rows[m]["kendall"] == pytest.approx(metrics.kendall(x, outcome), nan_ok=True)
        if math.isfinite(rows[m]["spearman"]):
            assert rows[m]["spearman_low"] <= rows[m]["spearman_high"]
    loo = metrics.loo_calibrated_car([rank[n]["reward"] for n in names], [rank[n]["loss_student"] for n in names], outcome)
    assert results["correlations"]["beta_calibration"]["corr_loo"] == pytest.approx(loo["corr_loo"], nan_ok=True)
    # every other signal is correlated too
    assert {"win_rate", "lc_win_rate", "reward_win_rate", "reward_mean", "heldout_loss"} <= set(results["correlations_by_outcome"])
    # the pair: which teacher's student was better, and whether each metric preferred that teacher
    (pair,) = results["pairs"]
    big, small = outcome[names.index("long")], outcome[names.index("short")]
    assert pair["better_student_from"] == ("larger" if big > small else "smaller" if small > big else "tie")
    if pair["better_student_from"] in ("larger", "smaller"):
        d = metrics.METRIC_DIRECTION["car"] * (rank["long"]["car"] - rank["short"]["car"])
        prefers = "larger" if d > 0 else "smaller"
        assert pair["car"] == ("right" if prefers == pair["better_student_from"] else "wrong")
    # next to Table 4: reward stands for the paper's three reward models
    table4 = results["table4"]
    assert [r["paper column"] for r in table4 if r["metric"] == "reward"] == ["ArmoRM", "Sky-8B", "Sky-27B"]
    car_row = next(r for r in table4 if r["metric"] == "car")
    assert car_row["rho (paper mean)"] == metrics.PAPER_TABLE4["mean"]["CAR"]


def test_study_answers_which_metric_to_trust_with_regret_noise_and_mixtures(studied):
    out, _, _, _ = studied
    results = json.loads((out / "results.json").read_text())
    rank = {t["teacher"]: t for t in json.loads((out / "rank" / "results.json").read_text())["teachers"]}
    names = [t["teacher"] for t in results["teachers"]]
    outcome = {t["teacher"]: t["outcome"] for t in results["teachers"]}
    arm = {a: -json.loads((out / "evaluate" / a / "results.json").read_text())["heldout_loss"]["mean"] for a in ARMS}
    best = max(names, key=outcome.get)
    trust = results["trust"]
    assert trust["best_teacher"] == best and trust["n_teachers"] == 5
    # the significance threshold for 5 teachers (two-sided 5%, t-approximation), written out here
    from scipy import stats
    t = stats.t.ppf(0.975, 3)
    assert trust["critical_spearman"] == pytest.approx(t / math.sqrt(3 + t * t))
    for row in trust["rows"]:  # the regret of each metric's pick, recomputed naively
        m = row["metric"]
        scores = {n: metrics.METRIC_DIRECTION[m] * rank[n][m] for n in names}
        pick = names[0]
        for n in names:
            if scores[n] > scores[pick]:
                pick = n
        assert row["pick"] == pick and row["regret"] == pytest.approx(outcome[best] - outcome[pick])
        assert row["regret"] >= 0 and row["significant"] == (abs(row["spearman"]) >= trust["critical_spearman"])
    # CAR against reward alone: the difference of their Spearman correlations
    x = lambda m: [metrics.METRIC_DIRECTION[m] * rank[n][m] for n in names]  # noqa: E731
    y = [outcome[n] for n in names]
    assert trust["car_vs_reward"]["difference"] == pytest.approx(
        metrics.spearman(x("car"), y) - metrics.spearman(x("reward"), y), nan_ok=True)
    # the noise: two seeds of one teacher against the spread across teachers
    noise = results["noise"]
    assert noise["rows"][0]["outcome_b"] == pytest.approx(arm["long@seed1"])
    assert noise["seed_sd"] == pytest.approx(abs(outcome["long"] - arm["long@seed1"]) / math.sqrt(2))
    assert noise["teacher_sd"] == pytest.approx(float(np.std(y, ddof=1)))
    # the mixtures: trained on the per-instruction picks of the rank run, compared with the best single teacher
    for mx in results["mixtures"]:
        assert mx["outcome"] == pytest.approx(arm[f"mix-{mx['rule']}"]) and mx["best_teacher"] == best
        assert mx["beats_best"] == (mx["outcome"] > outcome[best])
    summary = json.loads((out / "finetune" / "mix-grape" / "summary.json").read_text())
    assert summary["examples"]["records"] == 5  # one pick per training instruction
    # the answers lead: one per student, naming a metric
    (answer,) = results["answers"]
    assert answer["metric"] in METRICS and answer["text"].startswith(f"trust {answer['metric']}")
    html = (out / "report.html").read_text()
    assert html.index("Which metric to trust") < html.index("Teacher settings")


def test_second_study_run_skips_every_stage(studied):
    out, _, second, _ = studied
    assert second == 0
    results = json.loads((out / "results.json").read_text())
    assert all(stage["skipped"] for stage in results["stages"].values())


def test_interrupted_evaluation_resumes_without_judging_again(studied, study_workspace, judge_server):
    out, _, _, _ = studied
    base_url, seen = judge_server
    _, path = study_workspace
    before = json.loads((out / "results.json").read_text())
    # as if killed after judging but before the evaluation finished: its marker and results are gone
    (out / "evaluate" / "short" / "stage.json").unlink()
    (out / "evaluate" / "short" / "results.json").unlink()
    from teacherfit.pipelines.study import run_study

    requests = len(seen)
    results = run_study(load_config(StudyConfig, path, [_judge_url(base_url), f"out={out}"]))
    assert len(seen) == requests  # judgments already on disk are reused
    assert [k for k, v in results["stages"].items() if not v["skipped"]] == ["evaluate short"]
    assert results["teachers"][1]["outcome"] == pytest.approx(before["teachers"][1]["outcome"])


def test_study_report_is_self_contained(studied):
    out, _, _, _ = studied
    html = (out / "report.html").read_text()
    assert "Next to the paper&#x27;s Table 4" in html or "Next to the paper's Table 4" in html
    assert html.count('<img src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)=["'](?!data:)""", html) and "<script" not in html and "<link" not in html


def test_study_config_keeps_to_sequence_level_kd_and_its_own_fields(study_workspace):
    _, path = study_workspace
    with pytest.raises(ConfigError, match="kd.lambda must be 0"):
        load_config(StudyConfig, path, ["finetune.kd.lambda=0.5"])
    from teacherfit.pipelines.study import preflight

    with pytest.raises(ValueError, match="rank.student"):
        preflight(load_config(StudyConfig, path, ["rank.student=x"]))
    with pytest.raises(ValueError, match="not teacher names"):
        preflight(load_config(StudyConfig, path, ["pairs=[{larger: nope, smaller: short}]"]))
    cfg = load_config(StudyConfig, Path(path))
    assert cfg.finetune.kd.lambda_ == 0.0 and cfg.outcome == "heldout_loss"


# ------------------------------------------------------------------- several processes (accelerate launch)

def _stage_cfg():
    from teacherfit.config import CorrelateConfig

    return CorrelateConfig(rank_run="r", outcomes="o.json")


def _as_process(monkeypatch, rank: int, world: int = 2) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_main_only_stage_runs_once_and_the_others_wait_for_it(tmp_path, monkeypatch):
    import threading
    import time

    from teacherfit.pipelines import study

    monkeypatch.setattr(study, "POLL_S", 0.05)
    calls: list[int] = []
    _as_process(monkeypatch, 1)
    finishing = threading.Thread(target=lambda: (time.sleep(0.3), study.atomic_write_json(
        tmp_path / "stage.json", {"digest": study.config_digest(_stage_cfg()), "seconds": 12.5})))
    finishing.start()
    timings: dict = {}
    start = time.perf_counter()
    ran = study.run_stage(tmp_path, _stage_cfg(), lambda: calls.append(1), timings, "generate")
    finishing.join()
    assert not ran and calls == []  # a non-main process never runs a main-only stage ...
    assert time.perf_counter() - start >= 0.3  # ... it waited for the main one's marker
    assert timings["generate"] == {"seconds": 12.5, "skipped": False}

    # the main process runs it and writes the marker once
    _as_process(monkeypatch, 0)
    other = tmp_path / "other"
    assert study.run_stage(other, _stage_cfg(), lambda: calls.append(0), timings, "evaluate")
    assert calls == [0] and json.loads((other / "stage.json").read_text())["digest"] == study.config_digest(_stage_cfg())


def test_every_process_stage_runs_everywhere_and_a_main_failure_reaches_the_others(tmp_path, monkeypatch):
    from teacherfit.pipelines import study

    monkeypatch.setattr(study, "POLL_S", 0.05)
    digest = study.config_digest(_stage_cfg())
    calls: list[str] = []
    # rank 1 takes part in a sharded stage, then waits for the main one to mark it done
    _as_process(monkeypatch, 1)
    (tmp_path / "stage.json").write_text(json.dumps({"digest": "another config", "seconds": 1}))
    study.atomic_write_text(tmp_path / "stage.failed", f"{digest} RuntimeError: out of GPU memory")
    with pytest.raises(RuntimeError, match="main process failed the stage 'rank' .*out of GPU memory"):
        study.run_stage(tmp_path, _stage_cfg(), lambda: calls.append("rank 1"), {}, "rank", every_process=True)
    assert calls == ["rank 1"]
    # the main process failing a stage writes the failure for the others, and clears it when the stage succeeds
    _as_process(monkeypatch, 0)
    (tmp_path / "stage.failed").unlink()

    def boom():
        raise ValueError("bad reward model")

    with pytest.raises(ValueError):
        study.run_stage(tmp_path, _stage_cfg(), boom, {}, "rank", every_process=True)
    assert (tmp_path / "stage.failed").read_text() == f"{digest} ValueError: bad reward model"
    assert study.run_stage(tmp_path, _stage_cfg(), lambda: calls.append("rank 0"), {}, "rank", every_process=True)
    assert not (tmp_path / "stage.failed").exists() and calls == ["rank 1", "rank 0"]


# ------------------------------------------------------------------------------- several students, pooled

@pytest.fixture(scope="module")
def two_students(study_workspace, tokenizer, tmp_path_factory):
    root, path = study_workspace
    config = yaml.safe_load(path.read_text())
    student2 = save_tiny(tiny_qwen2(tokenizer, seed=8), tokenizer, root / "student2")
    config.update(student=[config["student"], str(student2)], teachers=config["teachers"][:3] + [
        {"name": "short-2", "backend": "file", "responses": "short.jsonl"}], seed_repeats=[], mixtures=[],
        pairs=[], baseline=False)
    config["evaluate"]["pairwise"]["judged"] = False
    config["finetune"]["train"]["max_steps"] = 1
    two = root / "two.yaml"
    two.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(StudyConfig, two, [f"out={root / 'two'}"]), root / "two"


def names_of(cfg) -> list[str]:
    return [t.name for t in cfg.teachers]


def test_two_students_share_the_responses_and_rewards_and_are_pooled(two_students, monkeypatch):
    from teacherfit.pipelines import rank, study

    from teacherfit import rewards

    cfg, out = two_students
    reward_runs, scored = [], []
    real = rank.reward_scorer
    monkeypatch.setattr(rank, "reward_scorer", lambda *a, **k: (reward_runs.append(1), real(*a, **k))[1])
    real_score = rewards.ClassifierReward.score
    monkeypatch.setattr(rewards.ClassifierReward, "score", lambda self, records, on_batch=None: (
        scored.extend((r.id, r.response) for r in records), real_score(self, records, on_batch))[1])
    results = study.run_study(cfg)
    dirs = [out / "students" / f"{k}-{Path(s).name}" for k, s in enumerate(cfg.students)]
    assert [st["dir"] for st in results["students"]] == [str(d) for d in dirs]
    for d in dirs:
        assert (d / "rank" / "results.json").exists() and (d / "evaluate" / "short" / "results.json").exists()
    # the rewards (and reward_2, and the reference LM's scores) do not depend on the student: scored once
    assert len(reward_runs) == 2  # reward and reward_2, for the first student only
    for stage in ("reward-", "reward_2-", "ref-"):
        (a,) = (dirs[0] / "rank" / "scores").glob(f"{stage}*.jsonl")
        assert (dirs[1] / "rank" / "scores" / a.name).read_text() == a.read_text()
    # the reference answers of the held-out instructions are rewarded once per student, not once per evaluation
    held = {json.loads(line)["id"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()}
    reference = {r["id"]: r["messages"][-1]["content"] for r in map(json.loads, (out.parent / "long.jsonl").read_text().splitlines())}
    assert sum(i in held and text == reference[i] for i, text in scored) == 2 * len(held)
    assert len({p.read_text() for p in out.glob("students/*/evaluate/*/scores/reference-reward-*.json")}) == 1
    assert len(list(out.glob("students/*/evaluate/*/scores/reference-reward-*.json"))) == 2 * len(names_of(cfg))
    # pooled: the mean of the two students' Spearman correlations, per metric
    names = [t.name for t in cfg.teachers]
    for row in results["pooled"]["rows"]:
        m = row["metric"]
        rhos = []
        for st in results["students"]:
            by = {t["teacher"]: t for t in st["teachers"]}
            rhos.append(metrics.spearman([metrics.METRIC_DIRECTION[m] * by[n][m] for n in names],
                                         [by[n]["outcome"] for n in names]))
        assert row["per_student"] == pytest.approx(rhos, nan_ok=True)
        if all(math.isfinite(r) for r in rhos):
            assert row["spearman"] == pytest.approx(np.mean(rhos))
        taus = [metrics.kendall([metrics.METRIC_DIRECTION[m] * {t["teacher"]: t for t in st["teachers"]}[n][m]
                                 for n in names], [{t["teacher"]: t for t in st["teachers"]}[n]["outcome"] for n in names])
                for st in results["students"]]
        if all(math.isfinite(t) for t in taus):
            assert row["kendall"] == pytest.approx(np.mean(taus))
        regrets = [next(r["regret"] for r in st["trust"]["rows"] if r["metric"] == m) for st in results["students"]]
        assert row["mean_regret"] == pytest.approx(np.mean(regrets))
    assert [a["student"] for a in results["answers"]] == [*cfg.students, "pooled"]
    html = (out / "report.html").read_text()
    assert html.count("Student ") >= 2 and "Pooled over the students" in html
