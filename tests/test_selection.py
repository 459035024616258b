"""The teacher-selection metrics after CAR (GRAPE, GRACE, a second reward) and the study's verdict helpers, each
against a naive reference written here from the papers, plus invariants; and how `rank` computes them."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from teacherfit import metrics
from teacherfit.data import load_records, tokenize_example
from test_pipelines import generated, invoke, ranked, workspace  # noqa: F401  (the module's fixtures)
from tiny import save_tiny, tiny_llama, tiny_reward_model

# ----------------------------------------------------------------------------------------------- GRAPE


def test_grape_selection_matches_a_loop_over_instructions():
    rng = np.random.default_rng(0)
    lp = rng.normal(size=(4, 30))
    lp[1, 3] = lp[2, 3] = 5.0  # a tie: the first teacher wins
    lp[:, 7] = np.nan  # nobody scored: no winner
    lp[0, 9] = np.nan  # a missing response cannot win
    out = metrics.grape_selection(lp)
    wins, decided = [0] * 4, 0
    for j in range(lp.shape[1]):
        best, best_value = -1, -math.inf
        for i in range(lp.shape[0]):
            if not math.isnan(lp[i, j]) and lp[i, j] > best_value:
                best, best_value = i, lp[i, j]
        assert out["winner"][j] == best
        if best >= 0:
            wins[best] += 1
            decided += 1
    assert out["winner"][3] == 1 and out["winner"][7] == -1 and out["winner"][9] != 0
    assert out["win_share"] == pytest.approx([w / decided for w in wins]) and sum(out["win_share"]) == pytest.approx(1)
    for i in range(4):
        row = [x for x in lp[i] if not math.isnan(x)]
        assert out["mean_logprob"][i] == pytest.approx(sum(row) / len(row))


# ----------------------------------------------------------------------------------------------- GRACE


def naive_grace(g: np.ndarray, group: int, test_fraction: float, n_splits: int, smooth: float) -> float:
    """From the paper and the authors' code, written another way: the smoothed preconditioner as
    (1 - c) K + c * (trace K / d) I (the same matrix when no eigenvalue needs clipping), second moments as sums of
    outer products, the inverse by np.linalg.inv."""
    n_prompts, d = len(g) // group, g.shape[1]
    n_test = max(1, int(n_prompts * test_fraction))
    total = 0.0
    for split in range(n_splits):
        order = np.random.default_rng(split).permutation(n_prompts)
        train_rows = [g[p * group + k] for p in order[: n_prompts - n_test] for k in range(group)]
        test_rows = [g[p * group + k] for p in order[n_prompts - n_test:] for k in range(group)]
        k_train = sum(np.outer(r / np.linalg.norm(r), r / np.linalg.norm(r)) for r in train_rows) / len(train_rows)
        k_test = sum(np.outer(r, r) for r in test_rows) / len(test_rows)
        pre = (1 - smooth) * k_train + smooth * np.trace(k_train) / d * np.eye(d)
        total += np.trace(np.linalg.inv(pre) @ k_test)
    return total / n_splits


@pytest.mark.parametrize("group", [1, 2])
def test_grace_score_matches_the_naive_reference(group):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(40, 6)) * rng.uniform(0.5, 3.0, size=(40, 1))
    got = metrics.grace_score(g, group_size=group, test_fraction=0.2, n_splits=5, smooth=0.05)
    assert got == pytest.approx(naive_grace(g, group, 0.2, 5, 0.05), rel=1e-9)
    # the authors' defaults
    assert metrics.grace_score(g) == pytest.approx(naive_grace(g, 1, 0.1, 10, 1e-3), rel=1e-9)


def test_grace_invariants_rotation_scale_and_diversity():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(30, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    base = metrics.grace_score(g)
    assert metrics.grace_score(g @ q) == pytest.approx(base, rel=1e-9)  # a basis change of the gradients
    assert metrics.grace_score(3.0 * g) == pytest.approx(9.0 * base, rel=1e-9)  # held-out magnitudes count, squared
    # held-out gradients in directions the training gradients do not cover cost much more than covered ones
    covered = np.zeros((30, 5))
    covered[:, 0] = rng.uniform(0.5, 2.0, size=30)
    uncovered = covered.copy()
    for row, axis in ((3, 1), (13, 2), (23, 3)):
        uncovered[row] = 0.0
        uncovered[row, axis] = covered[row, 0]
    assert metrics.grace_score(uncovered, test_fraction=0.2) > 10 * metrics.grace_score(covered, test_fraction=0.2)
    with pytest.raises(ValueError, match="groups of 4"):
        metrics.grace_score(g, group_size=4)


def test_gradient_sketch_equals_the_naive_projection_of_the_full_gradient(tokenizer):
    from teacherfit.scoring import GradientSketch

    model = tiny_llama(tokenizer, seed=3).float()
    ex = tokenize_example(tokenizer, [{"role": "user", "content": "List three colours."},
                                      {"role": "assistant", "content": "Red, green and blue."}])
    sketch = GradientSketch(model, dim=16, seed=5)
    got = np.array(sketch.project(ex.input_ids, ex.labels))
    # naive: the mean NLL of the labelled tokens from the full logits, its gradient by autograd, then each weight's
    # gradient added with its sign to its bucket in a Python loop over weights
    model.zero_grad()
    ids = torch.tensor([ex.input_ids])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    terms = [-logp[t - 1, ex.input_ids[t]] for t in range(1, len(ex.input_ids)) if ex.labels[t] != -100]
    (sum(terms) / len(terms)).backward()
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double().numpy()
    want = np.zeros(16)
    for p, buckets in zip([p for p in model.parameters() if p.requires_grad], sketch.buckets):
        if p.grad is None:
            continue
        for value, b in zip(p.grad.reshape(-1).tolist(), buckets.tolist()):
            want[b % 16] += value if b < 16 else -value
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6)
    # a different seed is another projection; inner products are kept in expectation (checked on a large sketch)
    assert not np.allclose(GradientSketch(model, dim=16, seed=6).project(ex.input_ids, ex.labels), got)
    big = np.array(GradientSketch(model, dim=4096, seed=7).project(ex.input_ids, ex.labels))
    assert np.linalg.norm(big) ** 2 == pytest.approx(np.linalg.norm(full) ** 2, rel=0.15)


# ------------------------------------------------------------------------------------ the study's helpers


def test_pick_regret_and_critical_correlations():
    outcomes = {"a": 0.2, "b": 0.9, "c": 0.5}
    assert metrics.pick_regret({"a": 3, "b": 1, "c": 2}, outcomes) == {
        "pick": "a", "best": "b", "regret": pytest.approx(0.7), "pick_rank": 3, "of": 3}
    assert metrics.pick_regret({"a": 3, "b": 1, "c": 2}, outcomes, direction=-1)["regret"] == 0.0
    assert metrics.pick_regret({"a": math.nan, "c": 1.0}, outcomes)["pick"] == "c"
    for n in (5, 10, 12):  # at the threshold, the t-test of the correlation has p = 0.05 exactly
        r = metrics.critical_correlation(n)
        t = r * math.sqrt((n - 2) / (1 - r * r))
        assert 2 * stats.t.sf(t, n - 2) == pytest.approx(0.05)
        tau = metrics.critical_correlation(n, "kendall")
        z = tau / math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
        assert 2 * stats.norm.sf(z) == pytest.approx(0.05)
    assert math.isnan(metrics.critical_correlation(2))


def test_paired_difference_and_pooled_correlations_against_loops():
    rng = np.random.default_rng(3)
    y = rng.normal(size=10)
    x1, x2 = y + rng.normal(size=10) * 0.3, rng.normal(size=10)
    diff, low, high = metrics.paired_corr_difference(x1, x2, y, n_resamples=300, seed=1)
    assert diff == pytest.approx(stats.spearmanr(x1, y).statistic - stats.spearmanr(x2, y).statistic)
    assert low <= diff <= high and diff > 0.5  # x1 tracks y, x2 is noise
    xs, ys = [x1, x2], [y, y[::-1]]
    rho, low, high = metrics.pooled_correlation(xs, ys, n_resamples=300, seed=1)
    assert rho == pytest.approx(np.mean([stats.spearmanr(a, b).statistic for a, b in zip(xs, ys)]))
    tau, _, _ = metrics.pooled_correlation(xs, ys, "kendall", n_resamples=10, seed=1)
    assert tau == pytest.approx(np.mean([stats.kendalltau(a, b).statistic for a, b in zip(xs, ys)]))
    # the interval resamples teachers, the same ones in every group: one resample recomputed by hand
    idx = np.random.default_rng(1).integers(0, 10, size=(300, 10))[0]
    by_hand = np.mean([stats.spearmanr(a[idx], b[idx]).statistic for a, b in zip(xs, ys)])
    assert low <= by_hand <= high or math.isnan(by_hand)


# ------------------------------------------------------------------------- in `rank`, on tiny real models


@pytest.fixture(scope="module")
def ranked_with_all(generated, workspace, tokenizer):  # noqa: F811
    root, teachers, student, rm_dir, _ = workspace
    rm2 = save_tiny(tiny_reward_model(tokenizer, seed=9), tokenizer, root / "rm2")
    invoke("rank", "--generate-run", generated, "--student", student, "--out", root / "rank-all",
           "--set", f"reference_lm={teachers['alpha']}", "--set", "reward.kind=classifier",
           "--set", f"reward.model={rm_dir}", "--set", f"reward_2={{kind: classifier, model: {rm2}}}",
           "--set", "bootstrap=0", "--set", "grace.dim=32", "--set", "grace.test_fraction=0.25", "--beta", "0.5")
    return root / "rank-all", rm2


def test_rank_computes_grape_grace_and_the_second_reward_as_their_references(ranked_with_all, workspace):
    run, rm2 = ranked_with_all
    results = json.loads((run / "results.json").read_text())
    samples = pq.read_table(run / "per_sample.parquet").to_pylist()
    rows = {t["teacher"]: t for t in results["teachers"]}
    names = list(dict.fromkeys(s["teacher"] for s in samples))
    ids = list(dict.fromkeys(s["id"] for s in samples))
    grid = {(s["teacher"], s["id"]): s for s in samples}
    # GRAPE: per instruction the lowest student loss (the highest mean log-probability) wins
    wins = dict.fromkeys(names, 0)
    for i in ids:
        wins[min(names, key=lambda n: (grid[n, i]["loss_student"], names.index(n)))] += 1
    for n in names:
        assert rows[n]["grape"] == pytest.approx(wins[n] / len(ids)) and rows[n]["grape_wins"] == wins[n]
    # the second reward: its own stage, its own per-sample values, CAR with it
    for n in names:
        r2 = [grid[n, i]["reward_2"] for i in ids]
        assert rows[n]["reward_2"] == pytest.approx(np.mean(r2))
        assert not np.allclose(r2, [grid[n, i]["reward"] for i in ids])
    means2 = [rows[n]["reward_2"] for n in names]
    losses = [rows[n]["loss_student"] for n in names]
    want = (metrics.car_sign_safe(means2, losses, 0.5) if metrics.car_variant_for(means2) == "sign_safe"
            else metrics.car(means2, losses, 0.5))
    assert [rows[n]["car_2"] for n in names] == pytest.approx(list(want))
    assert "rm2" in json.dumps(results["reward_2"]) and "rm2" not in json.dumps(results["reward"])
    # GRACE: from the stored projected gradients, in instruction order, as metrics.grace_score computes it
    (grads_file,) = (run / "scores").glob("grace-*.jsonl")
    stored = {(r["teacher"], r["id"]): r["grad"] for r in map(json.loads, grads_file.read_text().splitlines())}
    assert len(stored) == len(samples) and all(len(v) == 32 for v in stored.values())
    for n in names:
        g = np.array([stored[n, i] for i in ids])
        assert rows[n]["grace"] == pytest.approx(metrics.grace_score(g, test_fraction=0.25), rel=1e-9)
    assert len({rows[n]["grace"] for n in names}) == len(names)
    assert results["grace"]["dim"] == 32 and results["grace"]["examples"] == dict.fromkeys(names, len(ids))


def test_grace_gradient_of_a_row_is_the_students_projected_gradient(ranked_with_all, workspace, tokenizer):
    from transformers import AutoModelForCausalLM

    from teacherfit.scoring import GradientSketch

    run, _ = ranked_with_all
    _, _, student_dir, _, _ = workspace
    (grads_file,) = (run / "scores").glob("grace-*.jsonl")
    row = json.loads(grads_file.read_text().splitlines()[0])
    rec = next(r for r in load_records(run.parent / "gen" / "responses" / f"{row['teacher']}.jsonl").records
               if r.id == row["id"])
    model = AutoModelForCausalLM.from_pretrained(student_dir).float().eval()
    ex = tokenize_example(tokenizer, rec.messages)
    assert np.allclose(row["grad"], GradientSketch(model, 32, seed=0).project(ex.input_ids, ex.labels),
                       rtol=1e-4, atol=1e-7)


def test_the_same_reward_twice_is_refused(generated, workspace, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from teacherfit.cli import app

    root, teachers, student, rm_dir, _ = workspace
    result = CliRunner().invoke(app, [str(a) for a in (
        "rank", "--generate-run", generated, "--student", student, "--out", tmp_path / "r",
        "--set", "reward.kind=classifier", "--set", f"reward.model={rm_dir}",
        "--set", f"reward_2={{kind: classifier, model: {rm_dir}}}")])
    assert result.exit_code == 2 and "reward_2 is the same reward source" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_best_of_rank_grape_trains_on_the_response_the_student_finds_most_likely(ranked_with_all):
    from teacherfit.distill.examples import best_of_rank

    run, _ = ranked_with_all
    samples = pq.read_table(run / "per_sample.parquet").to_pylist()
    names = list(dict.fromkeys(s["teacher"] for s in samples))
    for rule, value in (("grape", lambda s: -s["loss_student"]), ("car", lambda s: s["car"])):
        chosen = {r.id: r for r in best_of_rank(run, rule)}
        assert len(chosen) == len({s["id"] for s in samples})
        for i, rec in chosen.items():
            rows = [s for s in samples if s["id"] == i]
            want = max(rows, key=lambda s: (value(s), -names.index(s["teacher"])))
            assert rec.meta["chosen_from"] == want["teacher"] and rec.meta["chosen_by"] == f"best_per_sample_{rule}"
            assert rec.meta["chosen_value"] == pytest.approx(value(want))
    grape = metrics.grape_selection([[-s["loss_student"] for s in samples if s["teacher"] == n] for n in names])
    ids = list(dict.fromkeys(s["id"] for s in samples))
    picks = {r.id: r.meta["chosen_from"] for r in best_of_rank(run, "grape")}
    assert [names[w] for w in grape["winner"]] == [picks[i] for i in ids]

