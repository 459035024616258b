"""`teacherfit evaluate`: verdict parsing, win-rate arithmetic, length control, and the pipeline end to end."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from teacherfit import evaluation as E
from teacherfit.cli import app
from teacherfit.config import EvaluateConfig, load_config
from teacherfit.data import DataError, Record
from test_rewards import chat_reply, scripted_server
from tiny import save_tiny, tiny_llama, tiny_qwen2

runner = CliRunner()


# --- verdict parsing ------------------------------------------------------------------------------------


def fastchat_rating(text: str) -> float:
    """FastChat llm_judge's single-grading rule, written out: the first [[r]], else the first [r], else -1."""
    match = re.search(r"\[\[(\d+\.?\d*)\]\]", text) or re.search(r"\[(\d+\.?\d*)\]", text)
    return float(match.group(1)) if match else -1


@pytest.mark.parametrize("text, ours, fastchat", [
    ("Rating: [[8]] (previous answer was [[5]])", 8.0, 8.0),  # the first verdict counts
    ("The answer is fine. Rating: [[8.]]", 8.0, 8.0),  # "8." is FastChat's 8.0
    ("It lists 3 points and 12 steps. [[8.5]]", 8.5, 8.5),
    ("[[3]] at first, but on reflection [[7]]", 3.0, 3.0),
    ("As [4] shows, it is weak. Rating: [[9]]", 9.0, 9.0),  # any [[r]] beats an earlier [r]
    ("Rating: [6]", 6.0, 6.0),  # the one-bracket fallback
    ("Rating: [[7]", 7.0, 7.0),  # ... which also reads an unclosed [[r]
    ("See [2]; overall [[ 7 ]]", 2.0, 2.0),  # FastChat's fallback finds the citation first: so do we
    ("[[10]]", 10.0, 10.0),
    ("Rating: [[-3]]", None, -1),
    ("It has 7 errors.", None, -1),  # a number in the explanation is not a rating
    ("", None, -1),
    # the documented differences
    ("Rating: [[0]]", None, 0.0),  # outside 1..10
    ("Rating: [[11]]", None, 11.0),
    ('Format: "[[rating]]", for example: "Rating: [[5]]". My verdict: [[9]]', 9.0, 5.0),  # the echoed example
    ("Rating: [[ 7 ]]", 7.0, -1),  # where FastChat reads nothing
    ("Overall. Rating: 4/10", 4.0, -1),
])  # fmt: skip
def test_parse_rating_verdict_follows_fastchat(text, ours, fastchat):
    assert fastchat_rating(text) == fastchat
    assert E.parse_rating_verdict(text) == ours


def fastchat_pair(text: str) -> str | None:
    """FastChat llm_judge's pairwise rule, written out: [[A]], else [[B]], else [[C]] (tie), else an error."""
    return next((v for v in "ABC" if f"[[{v}]]" in text), None)


@pytest.mark.parametrize("text, ours, fastchat", [
    ("A is more helpful. [[A]]", "A", "A"),
    ("[[B]]", "B", "B"),
    ("Both equal. [[C]]", "C", "C"),
    ("[[A]], and to repeat: [[A]]", "A", "A"),
    ("[[ A ]] ... final: [[A]]", "A", "A"),
    ("A is better.", None, None),
    ("[A]", None, None),
    ("[[a]]", None, None),
    # the documented differences
    ('"[[A]]" if A is better, "[[B]]" if B is better', None, "A"),  # echoed instructions: ambiguous
    ("[[B]] ... on reflection [[A]]", None, "A"),
    ("[[ B ]]", "B", None),  # where FastChat reads nothing
])  # fmt: skip
def test_parse_pair_verdict_follows_fastchat(text, ours, fastchat):
    assert fastchat_pair(text) == fastchat
    assert E.parse_pair_verdict(text) == ours


@pytest.mark.parametrize("ab, ba, outcome", [
    ("A", "B", 1.0),   # student wins as A and as B
    ("B", "A", 0.0),   # student loses in both orders
    ("A", "A", 0.5),   # the judge followed the first position: inconsistent -> tie
    ("B", "B", 0.5),
    ("C", "C", 0.5),
    ("A", "C", 0.5),   # win + tie is not a consistent win
    ("C", "A", 0.5),
    (None, "B", None),  # one order unparsed: the item is left out
    ("A", None, None),
])  # fmt: skip
def test_both_orders_combine_as_documented(ab, ba, outcome):
    assert E.combine_orders(E.student_outcome(ab, "A"), E.student_outcome(ba, "B")) == outcome


# --- win-rate arithmetic ----------------------------------------------------------------------------------


def test_win_rate_counts_ties_half_and_skips_unparsed():
    result = E.win_rate([1.0, 1.0, 0.5, 0.0, None, 1.0, 0.0, 0.5], n_resamples=0)
    # (1 + 1 + 0.5 + 0 + 1 + 0 + 0.5) / 7 = 4 / 7
    assert result["win_rate"] == pytest.approx(4 / 7)
    assert (result["n"], result["wins"], result["ties"], result["losses"]) == (7, 3, 2, 2)
    assert math.isnan(result["low"])
    ci = E.win_rate([1.0, 1.0, 0.5, 0.0, None, 1.0, 0.0, 0.5], n_resamples=500, seed=1)
    assert 0.0 <= ci["low"] <= 4 / 7 <= ci["high"] <= 1.0


def test_win_rate_of_nothing_is_nan_not_zero():
    assert math.isnan(E.win_rate([None, None])["win_rate"])


def test_paired_reward_outcomes():
    assert E.paired_win_outcomes([3.0, 1.0, 2.0, math.nan], [1.0, 2.0, 2.0, 1.0]) == [1.0, 0.0, 0.5, None]


# --- length control ---------------------------------------------------------------------------------------


def naive_newton(y, x, l2, steps=50):
    """Newton's method on mean BCE(sigmoid(theta + phi x), y) + l2/2 |(theta, phi)|^2: an independent fit."""
    X = np.stack([np.ones_like(x), x], 1)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) / len(y) + l2 * w
        hess = (X.T * (p * (1 - p))) @ X / len(y) + l2 * np.eye(2)
        w = w - np.linalg.solve(hess, grad)
    return w


def test_length_control_worked_example():
    """8 items where the student's answer is longer (6 wins), 2 where it is shorter (1 win).

    The feature takes two values, +t and -t (d = +5 or -5), so the logistic model is saturated and the
    maximum-likelihood fit reproduces both group rates: sigmoid(theta + phi t) = 3/4 and
    sigmoid(theta - phi t) = 1/2. Hence theta = (logit 3/4 + logit 1/2) / 2 = ln(3) / 2 and the LC win rate is
    sigmoid(ln 3 / 2) = sqrt(3) / (1 + sqrt(3)) = 0.63397, against a raw win rate of 7/10: most of the
    student's wins came with longer answers.
    """
    y = [1] * 6 + [0] * 2 + [1, 0]
    d = [5] * 8 + [-5] * 2
    fit = E.fit_length_control(y, d)
    assert fit["lc_win_rate"] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-3)  # the ridge moves it by 3e-4
    assert fit["phi"] > 0  # longer answers win more
    assert np.mean(y) == pytest.approx(0.7)
    theta, phi = naive_newton(np.array(y, float), E.length_feature(d), E.LC_L2)
    assert fit["theta"] == pytest.approx(theta, abs=1e-6) and fit["phi"] == pytest.approx(phi, abs=1e-6)
    # without the ridge the fit is the closed form exactly
    assert E.fit_length_control(y, d, l2=0.0)["lc_win_rate"] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-6)


def test_length_control_matches_newton_on_random_soft_labels():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 300, size=40)
    y = rng.choice([0.0, 0.5, 1.0], size=40, p=[0.3, 0.2, 0.5])
    fit = E.fit_length_control(y, d)
    theta, phi = naive_newton(y, np.tanh(d / d.std()), E.LC_L2)
    assert fit["theta"] == pytest.approx(theta, abs=1e-6) and fit["phi"] == pytest.approx(phi, abs=1e-6)


def test_length_control_equals_the_win_rate_when_lengths_do_not_differ():
    y = [1.0, 0.5, 0.0, 1.0, 1.0]
    fit = E.fit_length_control(y, [0, 0, 0, 0, 0], l2=0.0)
    assert fit["lc_win_rate"] == pytest.approx(np.mean(y), abs=1e-6) and fit["phi"] == 0.0


def test_length_controlled_win_rate_has_an_interval_and_skips_unparsed():
    y = [1, 1, 1, 1, 1, 1, 0, 0, None, 1, 0]
    d = [5, 5, 5, 5, 5, 5, 5, 5, 100, -5, -5]
    out = E.length_controlled_win_rate(y, d, n_resamples=200, seed=0)
    assert out["n"] == 10
    assert out["lc_win_rate"] == pytest.approx(E.fit_length_control([v for v in y if v is not None],
                                                                     [5] * 8 + [-5, -5])["lc_win_rate"])
    assert out["low"] <= out["lc_win_rate"] <= out["high"]


# --- MT-Bench data and prompts ------------------------------------------------------------------------------


def test_packaged_mtbench_questions_references_and_prompts():
    paths = E.default_paths()
    questions = E.load_questions(paths["questions"], paths["reference_answers"])
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    cats = {q.category for q in questions}
    assert len(cats) == 8 and all(sum(q.category == c for q in questions) == 10 for c in cats)
    graded_by_reference = [q for q in questions if E.needs_reference(q)]
    assert len(graded_by_reference) == 30 and {q.category for q in graded_by_reference} == set(E.REFERENCE_CATEGORIES)
    prompts = E.load_judge_prompts(paths["judge_prompts"])
    assert set(E.SINGLE_PROMPTS.values()) | set(E.PAIR_PROMPTS.values()) <= set(prompts)


def test_single_judge_prompts_follow_mtbench():
    prompts = E.load_judge_prompts(E.default_paths()["judge_prompts"])
    writing = E.Question(1, "writing", ["Q1", "Q2"])
    math_q = E.Question(2, "math", ["M1", "M2"], ["R1", "R2"])
    name, messages = E.single_judge_messages(prompts, writing, ["A1"], 1)
    assert name == "single-v1" and "[Question]\nQ1" in messages[-1]["content"] and "A1" in messages[-1]["content"]
    name, messages = E.single_judge_messages(prompts, math_q, ["A1", "A2"], 2)
    text = messages[-1]["content"]
    assert name == "single-math-v1-multi-turn"
    assert all(s in text for s in ("M1", "M2", "A1", "A2", "R1", "R2"))
    assert messages[0]["role"] == "system" and "second" in messages[0]["content"]
    name, messages = E.pairwise_judge_messages(prompts, "Q", "first", "second", reference="R")
    assert name == "pair-math-v1" and messages[-1]["content"].index("first") < messages[-1]["content"].index("second")


def test_mtbench_scores_leave_unparsed_out_and_count_them():
    rows = [dict(category="writing", turn=1, rating=8.0), dict(category="writing", turn=2, rating=6.0),
            dict(category="math", turn=1, rating=2.0), dict(category="math", turn=2, rating=None)]
    out = E.mtbench_scores(rows, n_resamples=0)
    writing, math_row = out["categories"]
    assert (writing["score"], writing["turn1"], writing["turn2"], writing["unparsed"]) == (7.0, 8.0, 6.0, 0)
    assert math_row["score"] == 2.0 and math.isnan(math_row["turn2"]) and math_row["unparsed"] == 1
    assert out["overall"]["score"] == pytest.approx(16 / 3) and out["overall"]["unparsed"] == 1


# --- the pipeline, with a scripted OpenAI-compatible judge ------------------------------------------------

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sea.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 2?", "And 3 + 3?"], "reference": ["4", "6"]},
    {"question_id": 3, "category": "writing", "turns": ["List three colours.", "Now three animals."]},
    {"question_id": 4, "category": "roleplay", "turns": ["Say hello as a pirate. NOVERDICT", "Say goodbye."]},
]
REFERENCE_LENGTHS = [1, 400, 30, 5]


def _between(text: str, start: str, end: str) -> str:
    return re.search(re.escape(start) + r"\n(.*)\n" + re.escape(end), text, re.S).group(1)


def scripted_judge(body: dict) -> dict:
    """Ratings: 7 on turn 1, 4 on turn 2; pairs: the longer answer wins; NOVERDICT questions get no verdict."""
    text = body["messages"][-1]["content"]
    if "NOVERDICT" in text:
        return chat_reply("I would rather not say.")
    if "[The Start of Assistant A's Answer]" in text:
        a = _between(text, "[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]")
        b = _between(text, "[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]")
        return chat_reply("Comparing both. " + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"))
    turn2 = "### Assistant A:" in text
    return chat_reply(f"The answer has 3 parts and 12 words. Rating: [[{4 if turn2 else 7}]]")


@pytest.fixture(scope="module")
def eval_workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    rows = [Record.from_messages([{"role": "user", "content": q["turns"][0]}]).with_response("r" * n).to_row()
            for q, n in zip(QUESTIONS, REFERENCE_LENGTHS)]
    (root / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, student


def evaluate_args(root: Path, student: Path, base_url: str, out: Path) -> list[str]:
    return ["evaluate", "--student", str(student), "--reference", str(root / "reference.jsonl"), "--out", str(out),
            "--set", f"judge={{backend: openai, remote: {{base_url: '{base_url}', model: fake, max_retries: 0}}}}",
            "--set", f"mtbench.questions={root / 'questions.jsonl'}", "--set", "decoding.max_new_tokens=12",
            "--set", "bootstrap=200"]


@pytest.fixture(scope="module")
def evaluated(eval_workspace):
    root, student = eval_workspace
    out = root / "run"
    with scripted_server(scripted_judge) as (base_url, seen):
        result = runner.invoke(app, evaluate_args(root, student, base_url, out))
        assert result.exit_code == 0, result.output + repr(result.exception)
        first_requests = len(seen)
        # a second run with the same --out resumes: nothing is generated or judged again
        again = runner.invoke(app, evaluate_args(root, student, base_url, out))
        assert again.exit_code == 0, again.output + repr(again.exception)
        assert len(seen) == first_requests
    return out, first_requests


def test_evaluate_cli_judges_every_turn_and_both_orders(evaluated):
    out, requests = evaluated
    # 4 questions x 2 turns (single) + 4 instructions x 2 orders (pairs)
    assert requests == 16
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    keys = {(j["kind"], j["item"], j["turn"], j["order"]) for j in judgments}
    assert len(judgments) == len(keys) == 16
    assert {j["prompt"] for j in judgments if j["item"] == "2" and j["kind"] == "single"} == {
        "single-math-v1", "single-math-v1-multi-turn"}  # reference-guided for math
    assert all(j["prompt_sha256"] == E.file_digest(E.default_paths()["judge_prompts"]) for j in judgments)
    turn2 = [json.loads(line) for line in (out / "answers/turn2/responses/student.jsonl").read_text().splitlines()]
    turn1 = {json.loads(line)["messages"][0]["content"]: json.loads(line)["messages"][1]["content"]
             for line in (out / "answers/turn1/responses/student.jsonl").read_text().splitlines()}
    for row in turn2:  # turn 2 is conditioned on the student's own first answer
        q1, a1 = row["messages"][0]["content"], row["messages"][1]["content"]
        assert turn1[q1] == a1 and row["messages"][2]["role"] == "user"


def test_evaluate_scores_match_hand_computation(evaluated):
    out, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    mt = results["mtbench"]
    # question 4 (roleplay) gets no verdict in either turn: 2 unparsed, counted, not scored
    assert mt["overall"]["unparsed"] == 2 and mt["overall"]["n"] == 6
    assert mt["overall"]["score"] == pytest.approx((7 * 3 + 4 * 3) / 6)
    by_cat = {c["category"]: c for c in mt["categories"]}
    assert by_cat["writing"]["turn1"] == 7 and by_cat["writing"]["turn2"] == 4 and by_cat["writing"]["score"] == 5.5
    assert math.isnan(by_cat["roleplay"]["score"]) and by_cat["roleplay"]["unparsed"] == 2
    assert any("left out of the scores, not scored 0" in n for n in results["notes"])

    pw = results["pairwise"]
    items = pq.read_table(out / "pairwise.parquet").to_pylist()
    assert len(items) == 4 and pw["unparsed_items"] == 1 and pw["unparsed_judgments"] == 2
    expected = []
    for it in items:
        if "NOVERDICT" in json.dumps(it) or it["verdict_ab"] is None:
            assert it["outcome"] is None
            continue
        diff = it["student_chars"] - it["reference_chars"]
        expected.append(1.0 if diff > 0 else 0.0 if diff < 0 else 0.5)
        assert it["outcome"] == expected[-1] and it["length_diff"] == diff
    assert pw["win_rate"]["win_rate"] == pytest.approx(np.mean(expected)) and pw["win_rate"]["n"] == 3
    assert pw["order_consistency"] == 1.0  # the scripted judge never follows positions
    diffs = [it["length_diff"] for it in items if it["outcome"] is not None]
    lc = E.fit_length_control(expected, diffs, scale=float(np.std(diffs)))
    assert pw["lc_win_rate"]["lc_win_rate"] == pytest.approx(lc["lc_win_rate"])
    assert results["heldout_loss"]["n"] == 4 and results["heldout_loss"]["mean"] > 0
    assert results["judge"]["backend"] == "openai"


def test_evaluate_report_is_self_contained(evaluated):
    out, _ = evaluated
    html = (out / "report.html").read_text()
    assert html.count("<table") >= 5 and html.count('<img src="data:image/png;base64,') == 2
    assert not re.search(r"""(src|href)=["'](?!data:)""", html) and "<script" not in html and "<link" not in html


def test_local_judge_that_writes_no_verdict_is_counted_not_scored(eval_workspace, tokenizer):
    root, student = eval_workspace
    judge = save_tiny(tiny_qwen2(tokenizer, seed=9), tokenizer, root / "judge")
    cfg = load_config(EvaluateConfig, None, [
        f"student={student}", f"judge={judge}", f"mtbench.questions={root / 'questions.jsonl'}", "mtbench.limit=2",
        "pairwise.enabled=false", "decoding.max_new_tokens=6", "judge_decoding.max_new_tokens=8", "bootstrap=0",
        f"out={root / 'local-judge'}"])
    from teacherfit.pipelines.evaluate import run_evaluate

    results = run_evaluate(cfg).results
    overall = results["mtbench"]["overall"]
    # a random tiny model writes no [[rating]]: every judgment is counted as unparsed and nothing is scored 0
    assert overall["n"] + overall["unparsed"] == 4 and results["judgments"]["total"] == 4
    assert overall["n"] == 0 and math.isnan(overall["score"])
    assert results["judge"]["backend"] == "transformers" and "heldout_loss" not in results


def test_pairwise_needs_a_reference():
    from teacherfit.pipelines.evaluate import preflight

    remote = "{backend: openai, remote: {base_url: 'http://127.0.0.1:9', model: m}}"
    cfg = load_config(EvaluateConfig, None, [f"student={remote}", f"judge={remote}"])
    with pytest.raises(ValueError, match="pairwise.reference"):
        preflight(cfg)


# --- every input is checked before any model loads ------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Any model load or generator fails the test: what is checked here must be checked before them."""
    import teacherfit.models
    import teacherfit.pipelines.evaluate as pipeline
    import teacherfit.pipelines.generate as generate

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module, name in ((teacherfit.models, "load_model"), (generate, "make_generator"), (pipeline, "make_generator")):
        monkeypatch.setattr(module, name, refuse)


def broken_inputs(root: Path, tmp: Path) -> dict:
    """name -> (overrides breaking one input, the file the message must name, its line or None, what it says)."""
    ref = root / "reference.jsonl"
    questions = root / "questions.jsonl"
    ok_questions = questions.read_text()
    files = {
        "bad_reference.jsonl": ref.read_text().splitlines()[0] + "\n{not json\n",
        "empty.jsonl": "",
        "other_reference.jsonl": json.dumps(Record.from_messages([{"role": "user", "content": "Something else."}])
                                            .with_response("r").to_row()) + "\n",
        "bad_questions.jsonl": ok_questions.splitlines()[0] + '\n{"turns": ["no id"]}\n',
        "prompts.jsonl": "".join(line + "\n" for line in E.default_paths()["judge_prompts"].read_text().splitlines()
                                 if '"single-math-v1"' not in line),
        "refs.jsonl": json.dumps({"question_id": 2, "choices": [{"turns": ["4"]}]}) + "\n",  # math, 2 turns, 1 answer
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    reference = lambda path: f"pairwise.reference={{name: reference, backend: file, responses: '{path}'}}"  # noqa: E731
    return {
        "missing reference": ([reference(tmp / "nope.jsonl")], tmp / "nope.jsonl", None, "no such file"),
        "malformed reference": ([reference(tmp / "bad_reference.jsonl")], tmp / "bad_reference.jsonl", 2, "JSON"),
        "empty reference": ([reference(tmp / "empty.jsonl")], tmp / "empty.jsonl", None, "no rows"),
        "reference for other prompts": ([reference(tmp / "other_reference.jsonl")], tmp / "other_reference.jsonl", None,
                                        "answers none of the 4 instructions"),
        "malformed question": ([f"mtbench.questions={tmp / 'bad_questions.jsonl'}"], tmp / "bad_questions.jsonl", 2,
                               "a question needs question_id and turns"),
        "judge prompt missing": ([f"mtbench.judge_prompts={tmp / 'prompts.jsonl'}"], tmp / "prompts.jsonl", None,
                                 "no judge prompt named 'single-math-v1'"),
        "one reference turn": ([f"mtbench.reference_answers={tmp / 'refs.jsonl'}"], tmp / "refs.jsonl", 1,
                               "question 2 (math) has 2 turns but 1 reference answers"),
        "missing held-out file": ([f"heldout={tmp / 'nope.jsonl'}"], tmp / "nope.jsonl", None, "no such file"),
    }


@pytest.mark.parametrize("case", ["missing reference", "malformed reference", "empty reference",
                                  "reference for other prompts", "malformed question", "judge prompt missing",
                                  "one reference turn", "missing held-out file"])
def test_every_input_is_checked_before_any_model_loads(eval_workspace, tmp_path, no_model, case):
    from teacherfit.pipelines.evaluate import run_evaluate

    root, student = eval_workspace
    overrides, path, line, says = broken_inputs(root, tmp_path)[case]
    out = tmp_path / "run"
    cfg = load_config(EvaluateConfig, None, [
        f"student={student}", "judge={backend: openai, remote: {base_url: 'http://127.0.0.1:9', model: fake}}",
        f"mtbench.questions={root / 'questions.jsonl'}",
        f"pairwise.reference={{name: reference, backend: file, responses: '{root / 'reference.jsonl'}'}}",
        f"out={out}", *overrides])
    with pytest.raises(DataError) as err:
        run_evaluate(cfg)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ") and says in message and "\n" not in message
    assert not out.exists()  # nothing generated, not even the run directory


def test_evaluate_cli_refuses_a_bad_reference_in_seconds(eval_workspace, tmp_path, no_model):
    """Before: the student answered every question first (11 minutes with the defaults), then the file was read."""
    root, student = eval_workspace
    bad = tmp_path / "reference.jsonl"
    bad.write_text((root / "reference.jsonl").read_text().splitlines()[0] + '\n{"oops": \n')
    for reference, says in ((tmp_path / "missing.jsonl", "no such file"), (bad, ":2:")):
        args = evaluate_args(root, student, "http://127.0.0.1:9", tmp_path / "run")
        args[args.index("--reference") + 1] = str(reference)
        start = time.perf_counter()
        result = runner.invoke(app, args)
        elapsed = time.perf_counter() - start
        assert result.exit_code == 2, result.output + repr(result.exception)
        output = result.output.replace("\n", "")  # rich folds long lines at the terminal width
        assert str(reference) in output and says in output and "Traceback" not in output
        assert [line.startswith("error:") for line in result.output.splitlines()].count(True) == 1 and elapsed < 5
        assert not (tmp_path / "run").exists()


# --- packaged models, end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_packaged_models_end_to_end(tmp_path):
    """SmolLM2-135M-Instruct judged by Qwen2.5-Coder-0.5B-Instruct on 2 MT-Bench questions (writing, and math
    graded against its reference), against Qwen2.5-Coder-0.5B-Instruct's own answers."""
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "evaluate", "--student", "smollm2-135m-instruct", "--judge", "qwen2.5-coder-0.5b-instruct", "--out", str(out),
        "--set", "mtbench.question_ids=[81, 111]",
        "--set", "pairwise.reference={name: qwen-coder, model: qwen2.5-coder-0.5b-instruct}",
        "--set", "decoding.max_new_tokens=64", "--set", "judge_decoding.max_new_tokens=64",
        "--set", "reward={kind: judge, model: qwen2.5-coder-0.5b-instruct}", "--set", "bootstrap=200",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((out / "results.json").read_text())
    mt = results["mtbench"]
    assert mt["questions"] == 2 and mt["reference_guided"] == 1
    assert mt["overall"]["n"] + mt["overall"]["unparsed"] == 4  # every judgment is either scored or counted
    assert all(1 <= j["verdict"] <= 10 for j in pq.read_table(out / "mtbench.parquet").to_pylist() if j["verdict"] is not None)
    pw = results["pairwise"]
    assert pw["items"] == 2 and results["judgments"]["total"] == 8
    assert pw["win_rate"]["n"] == 2 - pw["unparsed_items"]
    assert results["reward_win_rate"]["n"] + results["reward_win_rate"]["unparsed"] == 2
    assert math.isfinite(results["heldout_loss"]["mean"]) and results["heldout_loss"]["n"] == 2
    html = (out / "report.html").read_text()
    assert "MT-Bench score per category" in html and html.count("data:image/png;base64,") == 2


@pytest.mark.slow
@pytest.mark.server
def test_evaluate_with_a_real_openai_compatible_judge(eval_workspace, llama_server):
    """The API judge path against a real llama.cpp server (SmolLM2-135M-Instruct as the judge)."""
    root, student = eval_workspace
    out = root / "llama-judge"
    args = evaluate_args(root, student, llama_server, out) + [
        "--set", f"judge={{backend: openai, remote: {{base_url: '{llama_server}', model: smollm2, concurrency: 2}}}}",
        "--set", "judge_decoding.max_new_tokens=48", "--set", "mtbench.limit=2", "--set", "pairwise.limit=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["judgments"]["total"] == 8 and results["judge"]["model"] == "smollm2"
    assert results["judgments"]["ok"] + results["judgments"]["unparsed"] == 8
    mt, pw = results["mtbench"]["overall"], results["pairwise"]
    assert mt["n"] + mt["unparsed"] == 4 and pw["items"] == 2
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(j["output"] is not None for j in judgments)  # the raw judge text is kept, parsed or not
