"""`teacherfit evaluate`: MT-Bench single-answer grades, pairwise win rates and cheap signals for one student.

The sequence, one model in memory at a time:
1. the student answers the MT-Bench first turns and the pairwise instructions (one pass), then the MT-Bench
   second turns, each conditioned on its own first answer (``answers/turn1``, ``answers/turn2``);
2. the reference answers for the pairwise comparison: a response set, or a model that generates them;
3. the judge: MT-Bench grading of both turns, and every pair twice (student as A, then as B);
4. optional reward-model win rate, and the student's loss on held-out reference responses;
5. scores with bootstrap intervals, ``results.json``, per-item Parquet, ``report.html``.

Answers are generated through ``pipelines.generate`` (so they are resumable and carry provenance) and
judgments are appended one by one to ``judgments.partial.jsonl`` keyed by (kind, item, turn, order,
judge): a run killed at any point continues where it stopped, with no duplicate or lost judgment.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacherfit import evaluation as E
from teacherfit import metrics
from teacherfit.config import ConfigError, EvaluateConfig, GenerateConfig, TeacherConfig, prepare_run_dir
from teacherfit.data import DataError, Record, load_records, tokenize_example, tokenize_prompt
from teacherfit.generation import DecodingConfig
from teacherfit.pipelines.generate import generate_teacher, make_generator
from teacherfit.pipelines.rank import write_parquet
from teacherfit.rewards import _question_text
from teacherfit.store import ResumableJsonl, atomic_write_json, cached_json, sha256_json
from teacherfit.ui import console, progress_bar, rich_table

JUDGMENT_KEY = ("kind", "item", "turn", "order", "judge")


@dataclass
class EvaluateResult:
    run_dir: Path
    results: dict[str, Any]


# ------------------------------------------------------------------------------------------- inputs


def _sources(cfg: EvaluateConfig) -> dict[str, Path | None]:
    """Question, reference-answer and judge-prompt files: the user's, else the packaged MT-Bench ones.

    The packaged GPT-4 reference answers go with the packaged questions only (they are joined by
    question_id): a user's question file brings its own references (a file, or ``reference`` in its rows).
    """
    m = cfg.mtbench
    need_package = m.judge_prompts is None or m.questions is None
    defaults = E.default_paths() if need_package else {}
    references = m.reference_answers if m.questions is not None else (m.reference_answers or defaults["reference_answers"])
    return {"questions": Path(m.questions or defaults["questions"]),
            "reference_answers": Path(references) if references is not None else None,
            "judge_prompts": Path(m.judge_prompts or defaults["judge_prompts"])}


def _questions(cfg: EvaluateConfig, sources: dict[str, Path]) -> list[E.Question]:
    questions = E.load_questions(sources["questions"], sources["reference_answers"])
    if cfg.mtbench.categories:
        questions = [q for q in questions if q.category in cfg.mtbench.categories]
    if cfg.mtbench.question_ids:
        questions = [q for q in questions if q.question_id in cfg.mtbench.question_ids]
    if cfg.mtbench.limit:
        questions = questions[: cfg.mtbench.limit]
    if not questions:
        raise ConfigError(f"no MT-Bench question of {sources['questions']} is left after mtbench.categories / "
                          "question_ids / limit; widen them")
    return questions


def _first_turn(q: E.Question) -> Record:
    return Record.from_messages([{"role": "user", "content": q.turns[0]}],
                                meta={"question_id": q.question_id, "category": q.category})


def _pairwise_items(cfg: EvaluateConfig, questions: list[E.Question], sources: dict[str, Path]
                    ) -> list[tuple[Record, str | None]]:
    """(instruction record, reference answer for reference-guided judging or None) for the pairwise part."""
    if cfg.pairwise.instructions is not None:
        report = load_records(cfg.pairwise.instructions, on_error=cfg.on_error, limit=cfg.pairwise.limit)
        console.print(report.summary())
        return [(Record.from_messages(r.prompt, meta={"category": "general"}), None) for r in report.records]
    questions = questions or _questions(cfg, sources)
    items = [(_first_turn(q), q.reference[0] if E.needs_reference(q) else None) for q in questions]
    return items[: cfg.pairwise.limit] if cfg.pairwise.limit else items


def _generate(teacher: TeacherConfig, records: list[Record], cfg: EvaluateConfig, where: Path,
              decoding: DecodingConfig) -> dict[str, Record]:
    """Answers by record id, generated (or read from a response set) resumably under ``where``."""
    gen_cfg = GenerateConfig(instructions=where, teachers=[teacher], decoding=decoding, models=cfg.models,
                             max_prompt_tokens=cfg.max_prompt_tokens, on_error=cfg.on_error)
    run = generate_teacher(teacher, records, gen_cfg, where)
    answers = {r.id: r for r in load_records(run.path, require_response=True).records} if run.path.exists() else {}
    missing = [r.id for r in records if r.id not in answers]
    if missing:
        console.print(f"[yellow]{teacher.name}: no answer for {len(missing)} prompts (too long or missing from "
                      "the response set); those items are left out and counted[/]")
    return answers


# ------------------------------------------------------------------------------------------ judging


def judge_id(judge: TeacherConfig, decoding: DecodingConfig) -> str:
    """Judge name plus a digest of what it is (model or endpoint, decoding): a changed judge is a new key."""
    remote = judge.remote and judge.remote.identity()  # no secrets: a rotated key or password is the same judge
    what = json.dumps([judge.backend, judge.model, judge.revision, remote, decoding.model_dump()], sort_keys=True)
    return f"{judge.name}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def judge_tasks(questions: list[E.Question], turn1: dict[str, Record], turn2: dict[str, Record],
                pairs: list[tuple[Record, str | None]], reference: dict[str, Record], prompts: dict[str, dict],
                judge: str) -> list[dict]:
    """Every judgment to make: MT-Bench single grades (both turns) and each pair in both orders."""
    tasks = []
    for q in questions:
        first = turn1.get(_first_turn(q).id)
        if first is None:
            continue
        answers = [first.response]
        second = None
        if len(q.turns) > 1:
            second = turn2.get(_second_turn(q, first.response).id)
            if second is not None:
                answers.append(second.response)
        for turn in (1, 2) if second is not None else (1,):
            name, messages = E.single_judge_messages(prompts, q, answers, turn)
            tasks.append(dict(kind="single", item=str(q.question_id), turn=turn, order="-", judge=judge, prompt=name,
                              category=q.category, messages=messages))
    for record, ref_answer in pairs:
        mine, theirs = turn1.get(record.id), reference.get(record.id)
        if mine is None or theirs is None:
            continue
        question = _question_text(record)  # multi-message prompts joined with their roles
        for order, (a, b) in (("ab", (mine.response, theirs.response)), ("ba", (theirs.response, mine.response))):
            name, messages = E.pairwise_judge_messages(prompts, question, a, b, ref_answer)
            tasks.append(dict(kind="pair", item=record.id, turn=1, order=order, judge=judge, prompt=name,
                              category=record.meta.get("category", "general"), messages=messages))
    return tasks


def _second_turn(q: E.Question, first_answer: str) -> Record:
    return Record.from_messages(
        [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": first_answer},
         {"role": "user", "content": q.turns[1]}],
        meta={"question_id": q.question_id, "category": q.category, "turn": 2})


def run_judge(tasks: list[dict], cfg: EvaluateConfig, run_dir: Path, prompt_source: dict[str, str]) -> list[dict]:
    """Judge every task not yet in ``judgments.partial.jsonl``; return all judgment rows of these tasks."""
    store = ResumableJsonl(run_dir / "judgments.partial.jsonl", key_fields=JUDGMENT_KEY)
    key = lambda t: tuple(str(t[f]) if f == "item" else t[f] for f in JUDGMENT_KEY)  # noqa: E731
    done = store.done_keys()
    todo = [t for t in tasks if key(t) not in done]
    if todo:
        if len(done):
            console.print(f"judge: resuming, {len(tasks) - len(todo)} judgments already done, {len(todo)} to go")
        gen_cfg = GenerateConfig(instructions=run_dir, teachers=[cfg.judge], models=cfg.models)
        generator = make_generator(cfg.judge, gen_cfg)
        provenance = generator.provenance()
        loaded = getattr(generator, "loaded", None)
        runnable = []
        for t in todo:
            if loaded is not None and len(tokenize_prompt(loaded.tokenizer, t["messages"])) > cfg.max_prompt_tokens:
                store.append(_judgment_row(t, None, provenance, prompt_source, status="too_long"))
            else:
                runnable.append(t)
        with progress_bar("judge", len(runnable)) as advance:
            for index, completions in generator.generate([t["messages"] for t in runnable], cfg.judge_decoding):
                store.append(_judgment_row(runnable[index], completions[0], provenance, prompt_source))
                advance(1, completions[0].completion_tokens)
        del generator
        gc.collect()
    wanted = {key(t) for t in tasks}
    rows = [r for r in store.rows() if store.key_of(r) in wanted]
    store.finalize(run_dir / "judgments.jsonl")
    store.close()
    return rows


def _judgment_row(task: dict, completion, provenance: dict, prompt_source: dict[str, str], status: str = "ok") -> dict:
    text = completion.text if completion is not None else None
    if task["kind"] == "single":
        verdict = E.parse_rating_verdict(text) if text is not None else None
    else:
        verdict = E.parse_pair_verdict(text) if text is not None else None
    if status == "ok" and verdict is None:
        status = "unparsed"
    row = {f: task[f] for f in JUDGMENT_KEY}
    row.update(category=task["category"], prompt=task["prompt"], prompt_file=prompt_source["path"],
               prompt_sha256=prompt_source["sha256"], verdict=verdict, status=status, output=text,
               completion_tokens=completion.completion_tokens if completion is not None else 0,
               finish_reason=completion.finish_reason if completion is not None else None, judge_model=provenance)
    return row


# ----------------------------------------------------------------------------------- cheap signals


def reference_reward_file(scores: Path, tag: str, ids: list[str], reference: dict[str, Record]) -> Path:
    """Where the reference answers' rewards are kept: named by the reward and a digest of those answers, so an
    evaluation of another student against the same reference (a study's next arm) can be handed the file and
    reuse it, and a changed reference is scored again."""
    digest = sha256_json([[i, reference[i].messages] for i in ids])[:16]
    return scores / f"reference-reward-{tag}-{digest}.json"


def reward_stage(pairs: list[tuple[Record, str | None]], student: dict[str, Record], reference: dict[str, Record],
                 cfg: EvaluateConfig, scores: Path, tag: str) -> dict:
    from teacherfit.rewards import make_reward

    ids = [r.id for r, _ in pairs if r.id in student and r.id in reference]
    reward = make_reward(cfg.reward, cfg.models)
    ref_path = reference_reward_file(scores, tag, ids, reference)
    with progress_bar("reward", len(ids) * (1 if ref_path.exists() else 2)) as advance:
        mine = reward.score([student[i] for i in ids], on_batch=advance)
        theirs = cached_json(ref_path, lambda: {"ids": ids, "scores": reward.score(
            [reference[i] for i in ids], on_batch=advance), "reward": reward.provenance()})["scores"]
    out = {"reward": reward.provenance(), "ids": ids, "student": mine, "reference": theirs,
           "unparsed": getattr(reward, "unparsed", 0)}
    del reward
    gc.collect()
    return out


def heldout_stage(path: Path, cfg: EvaluateConfig) -> dict:
    """Mean token NLL of held-out reference responses under the student (lower = closer to the reference)."""
    from teacherfit.models import load_model
    from teacherfit.scoring import score_examples

    records = load_records(path, require_response=True, on_error=cfg.on_error).records
    loaded = load_model(cfg.student.model, device=cfg.models.device, dtype=cfg.models.dtype,
                        revision=cfg.student.revision, trust_remote_code=cfg.models.trust_remote_code)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_length
    examples = [tokenize_example(loaded.tokenizer, r.messages, max_length=min(cfg.max_length, context)) for r in records]
    with progress_bar("held-out loss", len(examples)) as advance:
        scored = score_examples(loaded.model, examples, pad_token_id=loaded.tokenizer.pad_token_id, on_batch=advance)
    out = {"model": loaded.provenance, "path": str(path), "ids": [r.id for r in records],
           "loss": [s.loss for s in scored], "n_tokens": [s.n_tokens for s in scored],
           "truncated": sum(ex.truncated for ex in examples)}
    del loaded
    gc.collect()
    return out


# -------------------------------------------------------------------------------------- aggregation


def pairwise_summary(pairs: list[tuple[Record, str | None]], judgments: list[dict], student: dict[str, Record],
                     reference: dict[str, Record], n_resamples: int, seed: int) -> tuple[dict, list[dict]]:
    """Per-item outcomes from both orders, the win rate and the length-controlled win rate."""
    verdicts = {(j["item"], j["order"]): j for j in judgments if j["kind"] == "pair"}
    items = []
    for record, _ in pairs:
        ab, ba = verdicts.get((record.id, "ab")), verdicts.get((record.id, "ba"))
        if ab is None or ba is None:
            continue
        o_ab = E.student_outcome(ab["verdict"], "A")
        o_ba = E.student_outcome(ba["verdict"], "B")
        mine, theirs = student[record.id].response or "", reference[record.id].response or ""
        items.append({"id": record.id, "category": record.meta.get("category", "general"),
                      "verdict_ab": ab["verdict"], "verdict_ba": ba["verdict"], "outcome_ab": o_ab,
                      "outcome_ba": o_ba, "outcome": E.combine_orders(o_ab, o_ba),
                      "student_chars": len(mine), "reference_chars": len(theirs),
                      "length_diff": len(mine) - len(theirs)})
    outcomes = [it["outcome"] for it in items]
    both = [it for it in items if it["outcome"] is not None]
    parsed = [j for j in judgments if j["kind"] == "pair" and j["verdict"] is not None]
    summary = {
        "win_rate": E.win_rate(outcomes, n_resamples=n_resamples, seed=seed),
        "lc_win_rate": E.length_controlled_win_rate(outcomes, [it["length_diff"] for it in items],
                                                    n_resamples=n_resamples, seed=seed),
        "items": len(items),
        "unparsed_items": len(items) - len(both),
        "unparsed_judgments": sum(j["kind"] == "pair" and j["verdict"] is None for j in judgments),
        # how much the judge follows positions: same outcome in both orders, and how often it picks "A"
        "order_consistency": float(np.mean([it["outcome_ab"] == it["outcome_ba"] for it in both])) if both else math.nan,
        "first_position_rate": float(np.mean([j["verdict"] == "A" for j in parsed])) if parsed else math.nan,
        "mean_length_diff": float(np.mean([it["length_diff"] for it in items])) if items else math.nan,
    }
    return summary, items


def _mean_ci(values: list[float], n_resamples: int, seed: int) -> dict:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    if n_resamples and len(v) > 1:
        est, low, high = metrics.bootstrap_ci(v, n_resamples=n_resamples, seed=seed)
    else:
        est, low, high = float(np.mean(v)), math.nan, math.nan
    return {"mean": est, "low": low, "high": high, "n": len(v)}


@dataclass
class Inputs:
    """Everything ``evaluate`` reads from files, read and checked by ``preflight`` before any model loads."""

    sources: dict[str, Path | None]
    prompts: dict[str, dict]
    questions: list[E.Question]
    pairs: list[tuple[Record, str | None]]


def preflight(cfg: EvaluateConfig) -> Inputs:
    """Every check that needs no weights, before any model loads or generates: the config, every input file
    (read, and checked against the others) and every model spec (resolved, not loaded)."""
    from teacherfit.models import resolve_model
    from teacherfit.pipelines.generate import preflight as check_teachers

    cfg.student.check_backend()
    cfg.judge.check_backend()
    if cfg.judge.backend == "file":
        raise ConfigError("judge: backend 'file' cannot judge; use transformers, vllm or openai")
    if not cfg.mtbench.enabled and not cfg.pairwise.enabled:
        raise ConfigError("nothing to evaluate: mtbench.enabled and pairwise.enabled are both false")
    if cfg.pairwise.enabled:
        if cfg.pairwise.reference is None:
            raise ConfigError("pairwise needs pairwise.reference (a response set `{name: ref, backend: file, responses: "
                              "PATH}` or a model `{name: ref, model: MODEL}`), or pairwise.enabled=false")
        cfg.pairwise.reference.check_backend()

    sources = _sources(cfg)
    prompts = E.load_judge_prompts(sources["judge_prompts"])
    questions = _questions(cfg, sources) if cfg.mtbench.enabled else []
    pairs = _pairwise_items(cfg, questions, sources) if cfg.pairwise.enabled else []
    if cfg.pairwise.enabled and not pairs:
        raise DataError(f"{cfg.pairwise.instructions}: no instruction to compare on", cfg.pairwise.instructions)
    E.check_judge_prompts(prompts, sources["judge_prompts"], questions,
                          [ref for _, ref in pairs] if cfg.pairwise.judged else [])
    if cfg.heldout is not None and cfg.heldout_loss:
        load_records(cfg.heldout, require_response=True, on_error=cfg.on_error)
    # response sets must answer these prompts; local models are found and verified; API keys are set
    instructions = cfg.pairwise.instructions or sources["questions"]
    first = [_first_turn(q) for q in questions] + [r for r, _ in pairs]
    for teacher, records in ((cfg.student, first), (cfg.pairwise.reference if pairs else None, [r for r, _ in pairs]),
                             (cfg.judge, [])):
        if teacher is not None:
            check_teachers(GenerateConfig(instructions=instructions, teachers=[teacher], models=cfg.models,
                                          on_error=cfg.on_error), records)
    if cfg.reward is not None and pairs:
        if cfg.reward.kind == "openai_judge":  # the config has checked that `remote` is given
            cfg.reward.remote.check_key()
        elif cfg.reward.model is None:
            raise ConfigError(f"reward.kind {cfg.reward.kind!r} needs reward.model")
        else:
            resolve_model(cfg.reward.model, convert=False)
    return Inputs(sources, prompts, questions, pairs)


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    inputs = preflight(cfg)  # before the run directory exists, and before any model
    run_dir = prepare_run_dir(cfg, "evaluate")
    sources, prompts, questions, pairs = inputs.sources, inputs.prompts, inputs.questions, inputs.pairs
    prompt_source = {"path": str(sources["judge_prompts"]), "sha256": E.file_digest(sources["judge_prompts"])}
    notes: list[str] = []

    # 1. student answers: MT-Bench first turns and pairwise instructions in one pass, then second turns
    first = {r.id: r for r in [_first_turn(q) for q in questions] + [r for r, _ in pairs]}
    turn1 = _generate(cfg.student, list(first.values()), cfg, run_dir / "answers" / "turn1", cfg.decoding)
    seconds = [_second_turn(q, turn1[_first_turn(q).id].response or "") for q in questions
               if len(q.turns) > 1 and _first_turn(q).id in turn1]
    turn2 = _generate(cfg.student, seconds, cfg, run_dir / "answers" / "turn2", cfg.decoding) if seconds else {}
    # 2. reference answers
    reference = (_generate(cfg.pairwise.reference, [r for r, _ in pairs], cfg, run_dir / "answers" / "reference",
                           cfg.decoding) if pairs else {})
    # 3. judge
    jid = judge_id(cfg.judge, cfg.judge_decoding)
    tasks = judge_tasks(questions, turn1, turn2, pairs if cfg.pairwise.judged else [], reference, prompts, jid)
    judgments = run_judge(tasks, cfg, run_dir, prompt_source)
    judge_model = next((j["judge_model"] for j in judgments), {"name": cfg.judge.name})

    results: dict[str, Any] = {
        "student": next((r.meta.get("teacher") for r in turn1.values()), {"name": cfg.student.name}),
        "judge": {"id": jid, **judge_model, "decoding": cfg.judge_decoding.model_dump()},
        "judge_prompts": {**prompt_source, "package": E.MTBENCH_PACKAGE if cfg.mtbench.judge_prompts is None else None},
        "notes": notes,
    }
    statuses = {s: sum(j["status"] == s for j in judgments) for s in ("ok", "unparsed", "too_long")}
    results["judgments"] = {"total": len(judgments), **statuses}
    mt_rows: list[dict] = []
    if cfg.mtbench.enabled:
        singles = [dict(category=j["category"], turn=j["turn"], rating=j["verdict"]) for j in judgments
                   if j["kind"] == "single"]
        results["mtbench"] = E.mtbench_scores(singles, n_resamples=cfg.bootstrap, seed=cfg.seed)
        results["mtbench"].update(questions=len(questions), source=str(sources["questions"]),
                                  reference_answers=sources["reference_answers"] and str(sources["reference_answers"]),
                                  reference_guided=sum(E.needs_reference(q) for q in questions))
        mt_rows = [{k: j[k] for k in ("item", "category", "turn", "prompt", "verdict", "status", "output")}
                   for j in judgments if j["kind"] == "single"]
        unparsed = results["mtbench"]["overall"]["unparsed"]
        if unparsed:
            notes.append(f"MT-Bench: {unparsed} of {len(singles)} judge outputs had no readable [[rating]] (or the "
                         "prompt was too long); they are counted here and left out of the scores, not scored 0")
    pair_items: list[dict] = []
    if cfg.pairwise.enabled and cfg.pairwise.judged:
        results["pairwise"], pair_items = pairwise_summary(pairs, judgments, turn1, reference, cfg.bootstrap, cfg.seed)
        results["pairwise"]["reference"] = next((r.meta.get("teacher") for r in reference.values()),
                                                {"name": cfg.pairwise.reference.name})
        pw = results["pairwise"]
        if pw["unparsed_items"]:
            notes.append(f"pairwise: {pw['unparsed_judgments']} judge outputs had no single [[A]]/[[B]]/[[C]] verdict; "
                         f"{pw['unparsed_items']} of {pw['items']} items lack a verdict in one order and are left out")

    scores = run_dir / "scores"
    scores.mkdir(exist_ok=True)
    if cfg.reward is not None and pairs:
        tag = cfg.reward.kind + "-" + (cfg.reward.model or (cfg.reward.remote.model if cfg.reward.remote else "")).replace("/", "_")
        rw = cached_json(scores / f"reward-{tag}.json", lambda: reward_stage(pairs, turn1, reference, cfg, scores, tag))
        outcomes = E.paired_win_outcomes(rw["student"], rw["reference"])
        results["reward_win_rate"] = {**E.win_rate(outcomes, n_resamples=cfg.bootstrap, seed=cfg.seed),
                                      "reward": rw["reward"], "unparsed": rw["unparsed"],
                                      "mean_student": _mean_ci(rw["student"], 0, 0)["mean"],
                                      "mean_reference": _mean_ci(rw["reference"], 0, 0)["mean"]}
        if rw["unparsed"]:
            notes.append(f"reward: {rw['unparsed']} judge answers could not be parsed (NaN, left out)")
        by_id = dict(zip(rw["ids"], zip(rw["student"], rw["reference"])))
        for it in pair_items:
            it["reward_student"], it["reward_reference"] = by_id.get(it["id"], (math.nan, math.nan))
    heldout_path = cfg.heldout or (run_dir / "answers" / "reference" / "responses" /
                                   f"{cfg.pairwise.reference.name}.jsonl" if pairs else None)
    if cfg.heldout_loss and heldout_path is not None and Path(heldout_path).exists():
        if cfg.student.backend != "transformers":
            notes.append(f"held-out loss needs the student's weights in process; backend {cfg.student.backend!r} skipped it")
        else:
            key = hashlib.sha256(f"{cfg.student.model}|{heldout_path}|{cfg.max_length}".encode()).hexdigest()[:10]
            ho = cached_json(scores / f"heldout-{key}.json", lambda: heldout_stage(Path(heldout_path), cfg))
            results["heldout_loss"] = {**_mean_ci(ho["loss"], cfg.bootstrap, cfg.seed), "path": ho["path"],
                                       "truncated": ho["truncated"]}

    atomic_write_json(run_dir / "results.json", results)
    if mt_rows:
        write_parquet(run_dir / "mtbench.parquet", mt_rows)
    if pair_items:
        write_parquet(run_dir / "pairwise.parquet", pair_items)
    from teacherfit.pipelines.reports import evaluate_report

    evaluate_report(results, mt_rows, pair_items).write(run_dir / "report.html")
    _print_summary(results)
    return EvaluateResult(run_dir, results)


def _print_summary(results: dict) -> None:
    if "mtbench" in results:
        rows = results["mtbench"]["categories"] + [{"category": "overall", **results["mtbench"]["overall"]}]
        console.print(rich_table(rows, ["category", "score", "turn1", "turn2", "n", "unparsed"], title="MT-Bench"))
    if "pairwise" in results:
        pw = results["pairwise"]
        console.print(f"win rate {pw['win_rate']['win_rate']:.3f} [{pw['win_rate']['low']:.3f}, {pw['win_rate']['high']:.3f}]"
                      f"  LC win rate {pw['lc_win_rate']['lc_win_rate']:.3f}  ({pw['items']} items, "
                      f"{pw['unparsed_items']} unparsed)")
    for note in results["notes"]:
        console.print(f"[yellow]note:[/] {note}")
