"""rank's score caches: matched by (teacher, instruction, content) under a digest of the scoring model, resumable
mid-stage, and a dry run that loads nothing. Tiny real models; every run is compared with a fresh one."""

import json

import pytest

from teacherfit import models
from teacherfit.config import RankConfig, finish_runs, load_config
from teacherfit.data import Record, write_records
from teacherfit.models import ModelError
from teacherfit.pipelines import rank
from teacherfit.pipelines.rank import run_rank
from tiny import save_tiny, tiny_llama, tiny_qwen2, tiny_reward_model

QUESTIONS = ["Name a colour.", "What is the capital of France?", "Write a short poem about the sea.",
             "def add(a, b):", "Translate good morning into French."]
ANSWERS = {
    "alpha": ["Red.", "Paris is the capital of France.", "The sea is blue and wide.", "return a + b", "bonjour"],
    "beta": ["Blue and green.", "Paris.", "Waves on the sea, the sky above.", "    return a + b\n", "Bonjour!"],
    "gamma": ["green", "France: Paris", "sea sky sea", "a + b", "good morning: bonjour"],
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rank_models")
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    ref = save_tiny(tiny_qwen2(tokenizer, seed=6), tokenizer, root / "ref")
    rm = tiny_reward_model(tokenizer)
    return student, ref, save_tiny(rm, tokenizer, root / "rm")


def write_set(path, answers):
    write_records(path, [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                         for q, a in zip(QUESTIONS, answers)])
    return path


def rank_cfg(models_dir, sets: dict, out, *extra) -> RankConfig:
    student, ref, rm = models_dir
    responses = "[" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in sets.items()) + "]"
    return load_config(RankConfig, None, [f"student={student}", f"reference_lm={ref}", "reward.kind=classifier",
                                          f"reward.model={rm}", "bootstrap=0", f"responses={responses}", f"out={out}",
                                          *extra])


def ranked(cfg, **kw):
    try:
        return run_rank(cfg, **kw)
    finally:
        finish_runs()


def score_rows(run_dir) -> dict[str, list[dict]]:
    """Rows of each stage's scores file, by stage name."""
    files = sorted((run_dir / "scores").glob("*.jsonl"))
    assert len(files) == 4, files  # one file per stage (GRACE's gradients included): no stage was keyed under another digest
    return {f.name.split("-")[0]: [json.loads(line) for line in f.read_text().splitlines()] for f in files}


def by_row(result) -> dict:
    return {(s["teacher"], s["id"]): s for s in result.samples}


def assert_same_scores(got, fresh):
    assert by_row(got).keys() == by_row(fresh).keys()
    for key, want in by_row(fresh).items():
        for field in ("reward", "loss_student", "loss_student_uncond", "loss_ref", "loss_ref_uncond", "length"):
            assert by_row(got)[key][field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), (key, field)
    cars = {t["teacher"]: t["car"] for t in fresh.teachers}
    assert {t["teacher"]: t["car"] for t in got.teachers} == pytest.approx(cars, rel=1e-5)


@pytest.fixture
def scored_calls(monkeypatch):
    """Counts the examples each stage's scorer was given (the real scorers run)."""
    from teacherfit import rewards, scoring

    seen = {"likelihood": 0, "reward": 0}
    score_examples, reward_score = scoring.score_examples, rewards.ClassifierReward.score

    def count_likelihood(model, examples, **kw):
        seen["likelihood"] += len(examples)
        return score_examples(model, examples, **kw)

    def count_reward(self, records, on_batch=None):
        seen["reward"] += len(records)
        return reward_score(self, records, on_batch=on_batch)

    monkeypatch.setattr(scoring, "score_examples", count_likelihood)
    monkeypatch.setattr(rewards.ClassifierReward, "score", count_reward)
    return seen


def test_added_teacher_and_edited_response_are_the_only_rows_scored(models_dir, tmp_path, scored_calls):
    sets = {n: write_set(tmp_path / f"{n}.jsonl", ANSWERS[n]) for n in ("alpha", "beta")}
    ranked(rank_cfg(models_dir, sets, tmp_path / "run"))
    assert {k: len(v) for k, v in score_rows(tmp_path / "run").items()} == {"student": 10, "ref": 10, "reward": 10,
                                                                             "grace": 10}
    assert scored_calls == {"likelihood": 2 * 2 * 10, "reward": 10}  # two models x two passes (IFD)

    # a third teacher, and one of alpha's responses edited in place (same instruction, same position)
    edited = list(ANSWERS["alpha"])
    edited[2] = "The sea is grey today."
    sets["alpha"] = write_set(tmp_path / "alpha.jsonl", edited)
    sets["gamma"] = write_set(tmp_path / "gamma.jsonl", ANSWERS["gamma"])
    result = ranked(rank_cfg(models_dir, sets, tmp_path / "run"))
    # only the 5 new rows and the edited one were scored; the old score of the edited row stays on disk unused
    assert scored_calls == {"likelihood": 2 * 2 * 16, "reward": 16}
    assert {k: len(v) for k, v in score_rows(tmp_path / "run").items()} == {"student": 16, "ref": 16, "reward": 16,
                                                                             "grace": 16}
    assert len(result.samples) == 15

    fresh = ranked(rank_cfg(models_dir, sets, tmp_path / "fresh"))
    assert_same_scores(result, fresh)
    # the edited response has its own row (the old one's content digest differs), and its own score
    edited_id = Record.from_messages([{"role": "user", "content": QUESTIONS[2]}]).id
    student_rows = score_rows(tmp_path / "run")["student"]
    losses = [r["loss"] for r in student_rows if (r["teacher"], r["id"]) == ("alpha", edited_id)]
    assert len(losses) == 2 and losses[0] != losses[1]
    assert by_row(result)["alpha", edited_id]["loss_student"] == losses[1]


def test_a_changed_scoring_model_is_not_served_another_models_scores(models_dir, tmp_path, scored_calls):
    sets = {n: write_set(tmp_path / f"{n}.jsonl", ANSWERS[n]) for n in ("alpha", "beta")}
    ranked(rank_cfg(models_dir, sets, tmp_path / "run"))
    first = scored_calls["likelihood"]
    ranked(rank_cfg(models_dir, sets, tmp_path / "run", "max_length=64"))  # max_length changes the student's scores
    assert scored_calls["likelihood"] == 2 * first and scored_calls["reward"] == 10
    assert len(list((tmp_path / "run" / "scores").glob("student-*.jsonl"))) == 2


@pytest.mark.parametrize("stage", ["likelihood", "reward"])
def test_a_run_killed_mid_stage_resumes_without_rescoring(models_dir, tmp_path, monkeypatch, scored_calls, stage):
    """An exception after two chunks of a stage (as a crash there would); the re-run scores only the rest."""
    from teacherfit import rewards, scoring

    sets = {n: write_set(tmp_path / f"{n}.jsonl", ANSWERS[n]) for n in ANSWERS}
    monkeypatch.setattr(rank, "ROWS_PER_CHUNK", 4)
    target, name = (scoring, "score_examples") if stage == "likelihood" else (rewards.ClassifierReward, "score")
    real, calls = getattr(target, name), []

    def crash_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == (5 if stage == "likelihood" else 3):  # likelihood: two passes per chunk
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, crash_on_third_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        ranked(rank_cfg(models_dir, sets, tmp_path / "run"))
    files = (tmp_path / "run" / "scores").glob("*.jsonl")
    partial = {f.name.split("-")[0]: len(f.read_text().splitlines()) for f in files}
    assert partial == ({"student": 8} if stage == "likelihood" else {"student": 15, "ref": 15, "reward": 8})
    monkeypatch.setattr(target, name, real)
    done = dict(scored_calls)
    result = ranked(rank_cfg(models_dir, sets, tmp_path / "run"))
    resumed = {k: scored_calls[k] - done[k] for k in done}
    if stage == "likelihood":  # the student's 7 remaining rows (2 passes), then the reference LM's 15
        assert resumed == {"likelihood": 2 * 7 + 2 * 15, "reward": 15}
    else:  # the likelihood stages are not run again, and no model of theirs is loaded
        assert resumed == {"likelihood": 0, "reward": 7}
    rows = score_rows(tmp_path / "run")
    for stage_rows in rows.values():
        keys = [(r["teacher"], r["id"], r["content"]) for r in stage_rows]
        assert len(keys) == len(set(keys)) == 15  # no duplicates
    assert_same_scores(result, ranked(rank_cfg(models_dir, sets, tmp_path / "fresh")))


def test_rerun_of_a_finished_rank_loads_no_model(models_dir, tmp_path, monkeypatch):
    sets = {n: write_set(tmp_path / f"{n}.jsonl", ANSWERS[n]) for n in ("alpha", "beta")}
    first = ranked(rank_cfg(models_dir, sets, tmp_path / "run"))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although every score is cached")

    monkeypatch.setattr(models, "load_model", no_loading)
    again = ranked(rank_cfg(models_dir, sets, tmp_path / "run", "beta=0.5"))
    assert by_row(again).keys() == by_row(first).keys()
    for key, want in by_row(first).items():
        assert {f: by_row(again)[key][f] for f in ("reward", "loss_student", "loss_ref_uncond")} == {
            f: want[f] for f in ("reward", "loss_student", "loss_ref_uncond")}


def test_dry_run_checks_everything_loads_nothing_and_counts_what_is_cached(models_dir, tmp_path, monkeypatch):
    sets = {n: write_set(tmp_path / f"{n}.jsonl", ANSWERS[n]) for n in ("alpha", "beta")}
    ranked(rank_cfg(models_dir, sets, tmp_path / "run"))

    def no_loading(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(models, "load_model", no_loading)
    sets["gamma"] = write_set(tmp_path / "gamma.jsonl", ANSWERS["gamma"])
    result = ranked(rank_cfg(models_dir, sets, tmp_path / "run"), dry_run=True)
    assert result.teachers == [] and result.run_dir == (tmp_path / "run").resolve()
    assert [(p["stage"], p["rows"], p["cached"], p["to score"]) for p in result.plan] == [
        ("student", 15, 10, 5), ("reference LM", 15, 10, 5), ("reward", 15, 10, 5), ("GRACE gradients", 15, 10, 5)]
    # GRACE scores the first grace.instructions instructions only
    result = ranked(rank_cfg(models_dir, sets, tmp_path / "run", "grace.instructions=4"), dry_run=True)
    assert result.plan[-1]["rows"] == 12
    # a dry run into a new directory creates nothing
    ranked(rank_cfg(models_dir, sets, tmp_path / "new"), dry_run=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("field", ["student", "reference_lm", "reward.model"])
def test_a_mistyped_model_fails_before_the_response_sets_are_read(models_dir, tmp_path, field):
    """Preflight comes first: the mistyped packaged name is reported, not the (also missing) response file."""
    sets = {"alpha": tmp_path / "missing.jsonl"}
    cfg = rank_cfg(models_dir, sets, tmp_path / "run", f"{field}=qwen2.5-coder-1.5b-instruc")
    for dry_run in (True, False):
        with pytest.raises(ModelError, match="did you mean the packaged model 'qwen2.5-coder-1.5b-instruct'"):
            ranked(cfg, dry_run=dry_run)
    assert not (tmp_path / "run").exists()

