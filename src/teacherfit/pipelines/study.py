"""`teacherfit study`: the CAR paper's experiment, end to end, for one student base and N teacher settings.

The sequence, each stage in its own subdirectory of the study's run directory:
1. ``data/``: the instructions split (seeded) into a training part and a held-out part;
2. ``generate/``: each teacher's responses to the training part (generated, or read from a response set);
3. ``rank/``: every `rank` metric (CAR, reward, length, PPL and IFD under the student and a reference LM);
4. ``finetune/<teacher>/``: the student fine-tuned on each teacher's responses (`distill` with kd.lambda = 0,
   i.e. sequence-level KD), the same budget for every teacher;
5. ``evaluate/<teacher>/`` (and ``evaluate/base/``, the untuned student for context): `evaluate` of each
   fine-tuned student, by default on the held-out instructions;
6. correlation of every metric with the outcome (Spearman and Kendall, bootstrap intervals), the
   larger-versus-smaller teacher pairs, beta by leave-one-out, and the comparison with the paper's Table 4.

A stage that finished writes ``stage.json`` with a digest of its config; a re-run with the same config skips
it, and a stage that was interrupted resumes through its own command's resumability (generate and evaluate
keep every finished row, distill its checkpoints, rank its scored stages).
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel

from teacherfit import metrics
from teacherfit.config import (
    DistillConfig,
    EvaluateConfig,
    GenerateConfig,
    RankConfig,
    StudyConfig,
    config_digest,
    prepare_run_dir,
)
from teacherfit.data import Record, load_records
from teacherfit.pipelines.correlate import CORRELATED, correlate
from teacherfit.store import atomic_write_json, atomic_write_text
from teacherfit.ui import console, rich_table

# how each outcome is read from an `evaluate` results.json; held-out loss is negated so higher = better
OUTCOME_READERS: dict[str, Callable[[dict], float]] = {
    "mtbench": lambda r: r["mtbench"]["overall"]["score"],
    "win_rate": lambda r: r["pairwise"]["win_rate"]["win_rate"],
    "lc_win_rate": lambda r: r["pairwise"]["lc_win_rate"]["lc_win_rate"],
    "reward_win_rate": lambda r: r["reward_win_rate"]["win_rate"],
    "reward_mean": lambda r: r["reward_win_rate"]["mean_student"],
    "heldout_loss": lambda r: -r["heldout_loss"]["mean"],
}
# interval ends of each outcome where evaluate reports one (same orientation as OUTCOME_READERS)
OUTCOME_INTERVALS: dict[str, Callable[[dict], tuple[float, float]]] = {
    "mtbench": lambda r: (r["mtbench"]["overall"]["low"], r["mtbench"]["overall"]["high"]),
    "win_rate": lambda r: (r["pairwise"]["win_rate"]["low"], r["pairwise"]["win_rate"]["high"]),
    "lc_win_rate": lambda r: (r["pairwise"]["lc_win_rate"]["low"], r["pairwise"]["lc_win_rate"]["high"]),
    "reward_win_rate": lambda r: (r["reward_win_rate"]["low"], r["reward_win_rate"]["high"]),
    "heldout_loss": lambda r: (-r["heldout_loss"]["high"], -r["heldout_loss"]["low"]),
}
# our metric -> the paper's Table 4 columns it stands for (our reward is one reward source, theirs three RMs)
PAPER_COLUMNS: dict[str, list[str]] = {
    "car": ["CAR"], "reward": ["ArmoRM", "Sky-8B", "Sky-27B"], "length": ["length"],
    "ppl_student": ["PPL-self"], "ifd_student": ["IFD-self"], "ppl_ref": ["PPL-GPT2"], "ifd_ref": ["IFD-GPT2"],
    "loss_student": [],
}
BASELINE = "base"


def _read_outcome(kind: str, results: dict) -> float:
    try:
        value = OUTCOME_READERS[kind](results)
    except (KeyError, TypeError):
        return math.nan
    return float(value) if value is not None else math.nan


def _read_interval(kind: str, results: dict) -> tuple[float, float]:
    try:
        low, high = OUTCOME_INTERVALS[kind](results)
    except (KeyError, TypeError):
        return math.nan, math.nan
    return (math.nan if low is None else float(low)), (math.nan if high is None else float(high))


# ------------------------------------------------------------------------------------------- stages


def _process() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _done(marker: Path, digest: str) -> dict | None:
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("digest") == digest:
            return done
    return None


def _wait_for_main(stage_dir: Path, digest: str, name: str) -> dict:
    """A non-main process waits for the main process to finish a stage (its ``stage.json``) or to fail it
    (``stage.failed``). Files, not a collective: a generation stage can take hours, longer than any
    process-group timeout, and a file also survives the main process dying."""
    marker, failed = stage_dir / "stage.json", stage_dir / "stage.failed"
    while True:
        done = _done(marker, digest)
        if done is not None:
            return done
        if failed.exists():
            what = failed.read_text().strip()
            if what.startswith(digest):
                raise RuntimeError(f"study: the main process failed the stage {name!r} ({what[len(digest) + 1:]}); "
                                   "fix that and launch again (finished work is kept)")
        time.sleep(POLL_S)


POLL_S = 2.0


def run_stage(stage_dir: Path, stage_cfg: BaseModel, fn: Callable[[], Any], timings: dict[str, dict], name: str,
              *, every_process: bool = False) -> bool:
    """Run ``fn`` unless ``stage_dir/stage.json`` records a finished run of the same config; True if it ran.

    Under several processes (accelerate launch / torchrun) a stage runs on the main process only, the others
    waiting for it, unless ``every_process``: then every process takes part (sharded ranking, data-parallel
    fine-tunes) and the main one alone marks the stage done.
    """
    digest = config_digest(stage_cfg)
    marker = stage_dir / "stage.json"
    rank, world = _process()
    done = _done(marker, digest)
    if done is not None:
        timings[name] = {"seconds": done["seconds"], "skipped": True}
        console.print(f"[dim]study: {name} already done ({done['seconds']:.0f} s when it ran), skipped[/]")
        return False
    if marker.exists() and rank == 0:
        console.print(f"[yellow]study: {name} ran before with another config; running it again[/]")
    if rank != 0 and not every_process:
        done = _wait_for_main(stage_dir, digest, name)
        timings[name] = {"seconds": done["seconds"], "skipped": False}
        return False
    console.rule(f"study: {name}")
    start = time.perf_counter()
    try:
        fn()
    except BaseException as err:
        if rank == 0 and world > 1:
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stage_dir / "stage.failed", f"{digest} {type(err).__name__}: {err}")
        raise
    seconds = round(time.perf_counter() - start, 1)
    if rank != 0:  # every process took part; the main one marks the stage done
        done = _wait_for_main(stage_dir, digest, name)
        timings[name] = {"seconds": done["seconds"], "skipped": False}
        return True
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage.failed").unlink(missing_ok=True)
    atomic_write_json(marker, {"digest": digest, "seconds": seconds,
                               "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    timings[name] = {"seconds": seconds, "skipped": False}
    return True


def split_instructions(cfg: StudyConfig, run_dir: Path) -> dict[str, Any]:
    """Seeded choice of ``cfg.heldout`` instructions for evaluation; the rest are the training instructions."""
    report = load_records(cfg.instructions, format=cfg.generate.format, on_error=cfg.generate.on_error,
                          limit=cfg.limit)
    records = [Record(r.id, r.prompt, r.source, {}) for r in report.records]
    if cfg.heldout >= len(records):
        raise ValueError(f"heldout={cfg.heldout} leaves no training instruction out of {len(records)}")
    held = set(np.random.default_rng(cfg.seed).choice(len(records), size=cfg.heldout, replace=False).tolist())
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"train": data / "train.jsonl", "heldout": data / "heldout.jsonl"}
    for part, keep in (("train", lambda i: i not in held), ("heldout", lambda i: i in held)):
        if _process()[0] != 0:  # the main process writes the split; the others only need its paths
            continue
        rows = [records[i].to_row() for i in range(len(records)) if keep(i)]
        atomic_write_text(paths[part], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"train": paths["train"], "heldout": paths["heldout"] if held else None,
            "n_train": len(records) - len(held), "n_heldout": len(held), "source": report.summary()}


def _dump(section: BaseModel, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in section.model_dump(mode="json", by_alias=True).items() if k not in drop}


def generate_config(cfg: StudyConfig, train: Path, run_dir: Path) -> GenerateConfig:
    return GenerateConfig.model_validate({**_dump(cfg.generate), "instructions": str(train),
                                          "teachers": [t.model_dump(mode="json") for t in cfg.teachers],
                                          "out": str(run_dir / "generate")})


def rank_config(cfg: StudyConfig, run_dir: Path, student: str | None = None, base: Path | None = None) -> RankConfig:
    """``run_dir``: the study's (its generate stage); ``base``: this student's part of it (``run_dir`` alone)."""
    return RankConfig.model_validate({**_dump(cfg.rank), "student": student or cfg.students[0], "responses": [],
                                      "generate_run": str(run_dir / "generate"), "out": str((base or run_dir) / "rank")})


SEED_ARM, MIX_ARM = "@seed", "mix-"


def arms(cfg: StudyConfig) -> list[str]:
    """What is fine-tuned: every teacher, each seed repeat (``<teacher>@seed<train.seed + 1>``) and each mixture
    (``mix-car``, ``mix-grape``). Only the teachers are correlated; the others answer their own questions."""
    repeat = cfg.finetune.train.seed + 1
    return ([t.name for t in cfg.teachers] + [f"{t}{SEED_ARM}{repeat}" for t in cfg.seed_repeats]
            + [f"{MIX_ARM}{rule}" for rule in cfg.mixtures])


def finetune_config(cfg: StudyConfig, arm: str, run_dir: Path, student: str | None = None,
                    base: Path | None = None) -> DistillConfig:
    data = _dump(cfg.finetune.data)
    train = _dump(cfg.finetune.train)
    if arm.startswith(MIX_ARM):
        data.update(best_of_rank=str((base or run_dir) / "rank"), best_of_rank_rule=arm[len(MIX_ARM):])
    else:
        teacher, _, seed = arm.partition(SEED_ARM)
        if seed:
            train["seed"] = int(seed)
        data["responses"] = [{"name": teacher, "path": str(run_dir / "generate" / "responses" / f"{teacher}.jsonl")}]
    return DistillConfig.model_validate({**_dump(cfg.finetune), "student": student or cfg.students[0], "data": data,
                                         "train": train, "out": str((base or run_dir) / "finetune" / arm)})


def evaluate_config(cfg: StudyConfig, model: str, name: str, heldout: Path | None, run_dir: Path) -> EvaluateConfig:
    """``run_dir``: where this student's evaluations go (the study's, or its student's part of it)."""
    values = _dump(cfg.evaluate)
    if values["pairwise"].get("instructions") is None and heldout is not None:
        values["pairwise"]["instructions"] = str(heldout)
    return EvaluateConfig.model_validate({**values, "student": {"name": "student", "model": model},
                                          "out": str(run_dir / "evaluate" / name)})


def preflight(cfg: StudyConfig) -> None:
    """Mistakes that would otherwise surface after an hour of work: misplaced fields, unknown pair names."""
    misplaced = [name for name, value in (
        ("rank.student", cfg.rank.student), ("rank.responses", cfg.rank.responses), ("rank.generate_run", cfg.rank.generate_run),
        ("finetune.student", cfg.finetune.student), ("finetune.data.responses", cfg.finetune.data.responses),
        ("finetune.data.best_of_rank", cfg.finetune.data.best_of_rank), ("evaluate.student", cfg.evaluate.student),
        ("generate.instructions", cfg.generate.instructions), ("generate.teachers", cfg.generate.teachers)) if value]
    if misplaced:
        raise ValueError(f"the study sets {', '.join(misplaced)} itself (student, instructions, teachers at the top "
                         "level); leave them unset")
    if cfg.finetune.teacher or cfg.finetune.teacher_cache or cfg.finetune.student_init:
        raise ValueError("finetune: the study fine-tunes the student itself on each teacher's responses; "
                         "leave teacher, teacher_cache and student_init unset")
    names = {t.name for t in cfg.teachers}
    if set(cfg.seed_repeats) - names:
        raise ValueError(f"seed_repeats: {sorted(set(cfg.seed_repeats) - names)} are not teacher names ({sorted(names)})")
    if len(set(cfg.mixtures)) != len(cfg.mixtures):
        raise ValueError(f"mixtures: each rule once ({cfg.mixtures})")
    clash = [n for n in names if n.startswith(MIX_ARM) or SEED_ARM in n]
    if clash:
        raise ValueError(f"teacher names {clash}: 'mix-' and '@seed' name the study's own arms; rename them")
    for pair in cfg.pairs:
        unknown = {pair.larger, pair.smaller} - names
        if unknown:
            raise ValueError(f"pairs: {sorted(unknown)} are not teacher names ({sorted(names)})")
    for t in cfg.teachers:
        t.check_backend()
    if BASELINE in names and cfg.baseline:
        raise ValueError(f"a teacher may not be called {BASELINE!r} (the untuned student's evaluation) with baseline on")
    # every model and file found (no weights loaded) and every key variable set, before an hour of generation
    from teacherfit.models import resolve_model

    specs = [*cfg.students, cfg.rank.reference_lm]
    specs += [t.model for t in cfg.teachers if t.backend == "transformers"]
    specs += [r.model for r in (cfg.rank.reward, cfg.rank.reward_2) if r is not None and r.kind != "openai_judge"]
    ev = cfg.evaluate
    judged = ev.mtbench.enabled or (ev.pairwise.enabled and ev.pairwise.judged)
    specs += [ev.judge.model] if judged and ev.judge.backend == "transformers" else []
    specs += [ev.reward.model] if ev.reward is not None and ev.reward.kind != "openai_judge" else []
    for spec in dict.fromkeys(s for s in specs if s):
        resolve_model(spec, convert=False)
    for t in cfg.teachers + ([ev.judge] if judged else []):
        if t.backend == "file":
            load_records(t.responses, require_response=True, on_error=cfg.generate.on_error)
        elif t.backend == "openai":
            t.remote.check_key()
    for r in (cfg.rank.reward, cfg.rank.reward_2):
        if r is not None and r.remote is not None:
            r.remote.check_key()


# -------------------------------------------------------------------------------------------- analysis


def outcome_table(teachers: list[str], evaluations: dict[str, dict]) -> dict[str, dict[str, float]]:
    """outcome kind -> teacher -> value, for every kind measured for at least one teacher."""
    table = {kind: {t: _read_outcome(kind, evaluations[t]) for t in teachers} for kind in OUTCOME_READERS}
    return {k: v for k, v in table.items() if any(math.isfinite(x) for x in v.values())}


def correlations_for(rank_teachers: list[dict], outcomes: dict[str, float], n_boot: int, seed: int) -> dict[str, Any]:
    """`correlate` (oriented metrics, Spearman with CI, Kendall, leave-one-out beta) plus Kendall intervals."""
    finite = {t: v for t, v in outcomes.items() if math.isfinite(v)}
    result = correlate(rank_teachers, finite, n_boot=n_boot, seed=seed) if len(finite) >= 3 else None
    if result is None:
        return {"error": f"only {len(finite)} teachers have this outcome; correlations need 3"}
    names = result["teachers"]
    for row in result["correlations"]:
        x = _oriented(rank_teachers, row["metric"], names)
        if n_boot and len(names) >= 2:
            _, row["kendall_low"], row["kendall_high"] = metrics.bootstrap_corr_ci(
                x, result["outcomes"], "kendall", n_resamples=n_boot, seed=seed)
        else:
            row["kendall_low"] = row["kendall_high"] = math.nan
    result.pop("paper_table4", None)
    return result


def safe_correlations(rank_teachers, outcomes, n_boot, seed) -> dict[str, Any]:
    try:
        return correlations_for(rank_teachers, outcomes, n_boot, seed)
    except ValueError as err:  # e.g. a constant outcome: no beta gives a defined correlation
        return {"error": str(err)}


def pair_checks(pairs, rank_teachers: list[dict], outcomes: dict[str, float]) -> list[dict]:
    """Per larger/smaller pair: which teacher gave the better student, and which one each metric preferred."""
    by_name = {t["teacher"]: t for t in rank_teachers}
    rows = []
    for pair in pairs:
        big, small = outcomes.get(pair.larger, math.nan), outcomes.get(pair.smaller, math.nan)
        better = None if not (math.isfinite(big) and math.isfinite(small)) else (
            "larger" if big > small else "smaller" if small > big else "tie")
        row = {"family": pair.family or "", "larger": pair.larger, "smaller": pair.smaller,
               "outcome_larger": big, "outcome_smaller": small, "better_student_from": better}
        for m in CORRELATED:
            a = by_name.get(pair.larger, {}).get(m, math.nan)
            b = by_name.get(pair.smaller, {}).get(m, math.nan)
            if not (math.isfinite(a) and math.isfinite(b)) or a == b:
                row[m] = None
                continue
            prefers = "larger" if metrics.METRIC_DIRECTION.get(m, 1) * (a - b) > 0 else "smaller"
            row[m] = prefers if better in (None, "tie") else ("right" if prefers == better else "wrong")
        rows.append(row)
    return rows


def table4_comparison(correlations: list[dict]) -> list[dict]:
    """Our rho per metric next to the paper's (mean and range over its five base models)."""
    paper = metrics.PAPER_TABLE4
    bases = [b for b in paper if b != "mean"]
    rows = []
    for row in correlations:
        for column in PAPER_COLUMNS.get(row["metric"], []) or [None]:
            ours, low, high = row["spearman"], row["spearman_low"], row["spearman_high"]
            out = {"metric": row["metric"], "paper column": column or "-", "rho (ours)": ours,
                   "low": low, "high": high, "kendall (ours)": row["kendall"]}
            if column is None:
                out["verdict"] = "no paper column"
            else:
                values = [paper[b][column] for b in bases]
                out.update({"rho (paper mean)": paper["mean"][column], "paper min": min(values), "paper max": max(values)})
                if not math.isfinite(ours):
                    out["verdict"] = "undefined here"
                else:
                    same_sign = (ours > 0) == (paper["mean"][column] > 0)
                    inside = math.isfinite(low) and low <= paper["mean"][column] <= high
                    out["verdict"] = ("consistent" if inside else "differs") + (
                        "" if same_sign else " (opposite sign)")
            rows.append(out)
    return rows


# ------------------------------------------------------------------------------------------------ run


def student_dir(run_dir: Path, cfg: StudyConfig, student: str) -> Path:
    """Where one student's rank, fine-tunes and evaluations go: the run directory itself for a one-student study,
    ``students/<k>-<name>/`` for each of several."""
    if len(cfg.students) == 1:
        return run_dir
    k = cfg.students.index(student)
    return run_dir / "students" / f"{k}-{Path(student).name.replace(' ', '_')}"


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    preflight(cfg)
    run_dir = prepare_run_dir(cfg, "study")
    clock = time.perf_counter()
    timings: dict[str, dict] = {}
    split = split_instructions(cfg, run_dir)
    console.print(f"study: {split['n_train']} training and {split['n_heldout']} held-out instructions ({split['source']})")
    from teacherfit.pipelines.generate import run_generate

    # 1. responses, once for every student
    gen_cfg = generate_config(cfg, split["train"], run_dir)
    run_stage(run_dir / "generate", gen_cfg, lambda: run_generate(gen_cfg), timings, "generate")
    per_student = [study_student(cfg, student, run_dir, split, timings) for student in cfg.students]
    if _process()[0] != 0:
        return {"run_dir": str(run_dir), "main_process": False}
    results = dict(per_student[0]) if len(per_student) == 1 else {"outcome": cfg.outcome}
    results.update({
        "students": per_student,
        "pooled": pooled_analysis(per_student, cfg) if len(per_student) > 1 else None,
        "instructions": per_student[0]["instructions"],
        "teacher_settings": [_setting(t, cfg) for t in cfg.teachers],
        "stages": timings,
        "seconds": round(time.perf_counter() - clock, 1),
    })
    results["answers"] = answers(results)
    atomic_write_json(run_dir / "results.json", results)
    from teacherfit.pipelines.reports import study_report

    study_report(results).write(run_dir / "report.html")
    _print_summary(results)
    console.print(f"results: {run_dir}")
    results["run_dir"] = str(run_dir)
    return results


SHARED_STAGES = ("ref", "reward", "reward_2")  # rank stages whose scores do not depend on the student


def share_scores(source: Path, target: Path, prefixes: tuple[str, ...] = SHARED_STAGES) -> None:
    """Hand scores that do not depend on the student on to the next run that needs them: the first student's rank
    stages of the reference LM and the rewards to the next student's rank run, and the first evaluation's rewards
    of the reference answers to every other evaluation of that student. The file names carry the digest of what the
    scores depend on, so the command reuses exactly what it would compute, and nothing is scored twice."""
    import shutil

    if source == target or not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if (any(path.name.startswith(f"{p}-") for p in prefixes) and ".rank" not in path.name
                and not (target / path.name).exists()):
            shutil.copyfile(path, target / path.name)


def drop_checkpoints(finetune_dir: Path) -> None:
    """A finished fine-tune keeps its model, log, summary and report; its checkpoints go once its stage is marked
    done (the stage is never resumed again, and only the model is evaluated). A 270M model's checkpoint with its
    AdamW state is 3 GB: a study of 26 fine-tunes would otherwise hold about 80 GB of them."""
    import shutil

    if (finetune_dir / "stage.json").exists():
        shutil.rmtree(finetune_dir / "checkpoints", ignore_errors=True)


def study_student(cfg: StudyConfig, student: str, run_dir: Path, split: dict, timings: dict) -> dict[str, Any]:
    """Rank, fine-tune every arm, evaluate and analyse for one student; its stages are named after it when the
    study has several."""
    from teacherfit.pipelines.distill import run_distill
    from teacherfit.pipelines.evaluate import run_evaluate
    from teacherfit.pipelines.rank import run_rank

    base = student_dir(run_dir, cfg, student)
    tag = "" if base == run_dir else f" [{base.name}]"
    notes: list[str] = []
    rank_cfg = rank_config(cfg, run_dir, student, base)
    first = student_dir(run_dir, cfg, cfg.students[0])
    if base != first and _process()[0] == 0:
        share_scores(first / "rank" / "scores", base / "rank" / "scores")
    run_stage(base / "rank", rank_cfg, lambda: run_rank(rank_cfg), timings, f"rank{tag}", every_process=True)
    ranked = json.loads((base / "rank" / "results.json").read_text())
    names = [t.name for t in cfg.teachers]

    # a fine-tune per arm (teachers, seed repeats, mixtures), the same budget
    finetunes: dict[str, dict] = {}
    for arm in arms(cfg):
        ft_cfg = finetune_config(cfg, arm, run_dir, student, base)
        run_stage(base / "finetune" / arm, ft_cfg, lambda c=ft_cfg: run_distill(c, resume=True), timings,
                  f"finetune {arm}{tag}", every_process=True)
        finetunes[arm] = json.loads((base / "finetune" / arm / "summary.json").read_text())
        if _process()[0] == 0:
            drop_checkpoints(base / "finetune" / arm)
    if _process()[0] != 0:  # what follows (evaluation, correlations) is the main process's
        return {}

    # an evaluation per fine-tuned student (and the untuned one, for context)
    evaluations: dict[str, dict] = {}
    models = [(a, finetunes[a]["model_dir"]) for a in arms(cfg)] + ([(BASELINE, student)] if cfg.baseline else [])
    for name, model in models:
        ev_cfg = evaluate_config(cfg, model, name, split["heldout"], base)
        share_scores(base / "evaluate" / models[0][0] / "scores", base / "evaluate" / name / "scores",
                     prefixes=("reference-reward",))
        run_stage(base / "evaluate" / name, ev_cfg, lambda c=ev_cfg: run_evaluate(c), timings, f"evaluate {name}{tag}")
        evaluations[name] = json.loads((base / "evaluate" / name / "results.json").read_text())

    # how well each metric predicted the outcome
    outcomes = outcome_table(names, evaluations)
    if cfg.outcome not in outcomes:
        raise ValueError(f"outcome {cfg.outcome!r} was not measured by this evaluation config (measured: "
                         f"{sorted(outcomes)}); set `outcome` to one of those or enable it under `evaluate`")
    by_outcome = {kind: safe_correlations(ranked["teachers"], values, cfg.bootstrap, cfg.seed)
                  for kind, values in outcomes.items()}
    primary = by_outcome[cfg.outcome]
    if "error" in primary:
        notes.append(f"no correlation with {cfg.outcome}: {primary['error']}")
    teachers = _teacher_rows(ranked["teachers"], names, outcomes, evaluations, finetunes, cfg.outcome)
    baseline = ({kind: _read_outcome(kind, evaluations[BASELINE]) for kind in OUTCOME_READERS}
                if cfg.baseline else None)
    primary_outcomes = outcomes[cfg.outcome]
    pairs = pair_checks(cfg.pairs, ranked["teachers"], primary_outcomes)
    table4 = table4_comparison(primary["correlations"]) if "correlations" in primary else []
    extra = {a: _read_outcome(cfg.outcome, evaluations[a]) for a in arms(cfg) if a not in names}
    trust = metric_trust(ranked["teachers"], primary_outcomes, primary, cfg)
    noise = outcome_noise(primary_outcomes, extra, cfg)
    mixtures = mixture_check(primary_outcomes, extra, cfg)
    notes += _findings(primary, pairs, cfg.outcome)
    if ranked["car_variant"] == "sign_safe":
        notes.append("CAR used the sign-safe variant (some rewards <= 0)")
    judges = {"rank reward": ranked["reward"], "rank reward_2": ranked.get("reward_2"),
              "outcome": evaluations[names[0]].get("reward") or evaluations[names[0]].get("judge")}
    if cfg.outcome.startswith("reward") and cfg.evaluate.reward is not None and cfg.evaluate.reward == cfg.rank.reward:
        notes.append("the rank reward and the outcome come from the same reward source: the reward's and CAR's "
                     "correlations with the outcome are inflated by construction (set rank.reward_2 or another "
                     "evaluate.reward)")
    return {
        "student": ranked["student"],
        "student_spec": student,
        "dir": str(base),
        "reference_lm": ranked["reference_lm"],
        "reward": ranked["reward"],
        "reward_2": ranked.get("reward_2"),
        "grace": ranked.get("grace"),
        "judges": judges,
        "beta": ranked["beta"],
        "car_variant": ranked["car_variant"],
        "outcome": cfg.outcome,
        "instructions": {"source": str(cfg.instructions), "n_train": split["n_train"], "n_heldout": split["n_heldout"],
                         "ranked_on": ranked["n_instructions"]},
        "teacher_settings": [_setting(t, cfg) for t in cfg.teachers],
        "finetune": {"kd_lambda": 0.0, "train": cfg.finetune.train.model_dump(), "lora": cfg.finetune.lora and cfg.finetune.lora.model_dump()},
        "evaluation": {"judge": evaluations[names[0]].get("judge"), "signals": sorted(outcomes)},
        "teachers": teachers,
        "arms": [{"arm": a, "outcome": v, "finetune_steps": finetunes[a].get("steps")} for a, v in extra.items()],
        "baseline": baseline,
        "correlations": primary,
        "correlations_by_outcome": {k: v.get("correlations", v) for k, v in by_outcome.items()},
        "beta_by_outcome": {k: v.get("beta_calibration") for k, v in by_outcome.items()},
        "trust": trust,
        "noise": noise,
        "mixtures": mixtures,
        "pairs": pairs,
        "table4": table4,
        "paper_table4": metrics.PAPER_TABLE4,
        "notes": notes,
    }


def _oriented(rank_teachers: list[dict], metric: str, names: list[str]) -> list[float]:
    """``metric`` of each named teacher, times its direction (so that higher means the metric prefers it)."""
    by_name = {t["teacher"]: t for t in rank_teachers}
    return [metrics.METRIC_DIRECTION.get(metric, 1) * by_name[n].get(metric, math.nan) for n in names]


def metric_trust(rank_teachers: list[dict], outcomes: dict[str, float], primary: dict, cfg: StudyConfig) -> dict[str, Any]:
    """Per metric: its correlations (from ``primary``), whether they pass the significance threshold for this many
    teachers, the regret of its pick, and CAR against reward alone (paired bootstrap over teachers)."""
    names = [t for t, v in outcomes.items() if math.isfinite(v)]
    n = len(names)
    rows = []
    for corr in primary.get("correlations", []):
        m = corr["metric"]
        pick = metrics.pick_regret({t: v for t, v in zip(names, _oriented(rank_teachers, m, names))},
                                   {t: outcomes[t] for t in names})
        rows.append({**{k: corr.get(k) for k in ("metric", "spearman", "spearman_low", "spearman_high", "kendall",
                                                   "kendall_low", "kendall_high", "n")},
                     "significant": bool(abs(corr["spearman"]) >= metrics.critical_correlation(corr["n"]))
                     if math.isfinite(corr["spearman"]) else False,
                     "pick": pick["pick"], "pick_rank": pick["pick_rank"], "regret": pick["regret"]})
    outcome_values = [outcomes[t] for t in names]
    car_vs_reward = None
    if n >= 3 and {"car", "reward"} <= {r["metric"] for r in rows}:
        car_vs_reward = dict(zip(("difference", "low", "high"), metrics.paired_corr_difference(
            _oriented(rank_teachers, "car", names), _oriented(rank_teachers, "reward", names), outcome_values,
            n_resamples=max(cfg.bootstrap, 1), seed=cfg.seed)))
    spread = float(max(outcome_values) - min(outcome_values)) if outcome_values else math.nan
    return {"n_teachers": n, "critical_spearman": metrics.critical_correlation(n),
            "critical_kendall": metrics.critical_correlation(n, "kendall"), "rows": rows,
            "car_vs_reward": car_vs_reward, "outcome_range": spread,
            "best_teacher": max(names, key=lambda t: outcomes[t]) if names else None}


def outcome_noise(outcomes: dict[str, float], extra: dict[str, float], cfg: StudyConfig) -> dict[str, Any] | None:
    """The outcome's spread across two training seeds of one teacher, against its spread across teachers: the
    fine-tunes can tell teachers apart only if the first is well under the second."""
    if not cfg.seed_repeats:
        return None
    repeat = cfg.finetune.train.seed + 1
    rows = []
    for t in cfg.seed_repeats:
        a, b = outcomes.get(t, math.nan), extra.get(f"{t}{SEED_ARM}{repeat}", math.nan)
        rows.append({"teacher": t, "seed_a": cfg.finetune.train.seed, "outcome_a": a, "seed_b": repeat,
                     "outcome_b": b, "abs_difference": abs(a - b)})
    values = np.array([v for v in outcomes.values() if math.isfinite(v)])
    sd_teachers = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    diffs = [r["abs_difference"] for r in rows if math.isfinite(r["abs_difference"])]
    # two seeds of one teacher differ by |a - b|; for the sd of one fine-tune's outcome: |a - b| / sqrt(2)
    seed_sd = float(np.sqrt(np.mean(np.square(diffs)) / 2)) if diffs else math.nan
    return {"rows": rows, "seed_sd": seed_sd, "teacher_sd": sd_teachers,
            "teacher_range": float(values.max() - values.min()) if len(values) else math.nan,
            "ratio": seed_sd / sd_teachers if sd_teachers else math.nan}


def mixture_check(outcomes: dict[str, float], extra: dict[str, float], cfg: StudyConfig) -> list[dict]:
    """Each mixture's outcome against the best single teacher's."""
    finite = {t: v for t, v in outcomes.items() if math.isfinite(v)}
    if not finite:
        return []
    best = max(finite, key=finite.get)
    return [{"mixture": f"{MIX_ARM}{rule}", "rule": rule, "outcome": extra.get(f"{MIX_ARM}{rule}", math.nan),
             "best_teacher": best, "best_outcome": finite[best],
             "beats_best": extra.get(f"{MIX_ARM}{rule}", math.nan) > finite[best],
             "rank_among_teachers": 1 + sum(v > extra.get(f"{MIX_ARM}{rule}", math.nan) for v in finite.values())}
            for rule in cfg.mixtures]


def pooled_analysis(per_student: list[dict], cfg: StudyConfig) -> dict[str, Any]:
    """Every metric over all students: the mean of the per-student Spearman (and Kendall) correlations, with a bootstrap interval
    that resamples teachers (the same teachers for every student: they answered the same instructions), and the
    mean regret."""
    names = [t.name for t in cfg.teachers]
    metric_names = [r["metric"] for r in per_student[0]["trust"]["rows"]]
    rows = []
    for m in metric_names:
        xs = [_oriented(st["teachers"], m, names) for st in per_student]
        ys = [_oriented(st["teachers"], "outcome", names) for st in per_student]  # "outcome": direction +1
        rho, low, high = metrics.pooled_correlation(xs, ys, n_resamples=max(cfg.bootstrap, 1), seed=cfg.seed)
        tau, tau_low, tau_high = metrics.pooled_correlation(xs, ys, "kendall", n_resamples=max(cfg.bootstrap, 1),
                                                           seed=cfg.seed)
        trust = [{r["metric"]: r for r in st["trust"]["rows"]}.get(m, {}) for st in per_student]
        regrets = [t.get("regret", math.nan) for t in trust]
        rows.append({"metric": m, "spearman": rho, "spearman_low": low, "spearman_high": high,
                     "kendall": tau, "kendall_low": tau_low, "kendall_high": tau_high,
                     "per_student": [t.get("spearman", math.nan) for t in trust],
                     "mean_regret": float(np.mean(regrets)), "regrets": regrets})
    return {"students": [st["student_spec"] for st in per_student], "rows": rows}


def answers(results: dict[str, Any]) -> list[dict[str, Any]]:
    """What the report leads with, per student (and pooled): the metric to trust, how sure, and its regret."""
    out = []
    for st in results["students"]:
        trust = st["trust"]
        rows = [r for r in trust["rows"] if r["spearman"] is not None and math.isfinite(r["spearman"])]
        if not rows:
            out.append({"student": st["student_spec"], "text": "no metric could be correlated with the outcome"})
            continue
        best = max(rows, key=lambda r: (r["spearman"], -r["regret"]))
        sure = ("significant" if best["significant"] else "not significant") + (
            f" at {trust['n_teachers']} teachers (|rho| >= {trust['critical_spearman']:.2f} needed)")
        zero_regret = [r["metric"] for r in rows if r["regret"] == 0]
        text = (f"trust {best['metric']} most for {st['student_spec']}: Spearman {best['spearman']:.2f} "
                f"[{best['spearman_low']:.2f}, {best['spearman_high']:.2f}], {sure}; its pick "
                f"{best['pick']} is rank {best['pick_rank']} of {trust['n_teachers']} (regret {best['regret']:.3g})")
        if not best["significant"] or (math.isfinite(best["spearman_low"]) and best["spearman_low"] <= 0):
            text += "; the interval includes no agreement: no metric is shown to rank teachers for this student"
        out.append({"student": st["student_spec"], "metric": best["metric"], "spearman": best["spearman"],
                    "significant": best["significant"], "zero_regret": zero_regret, "text": text})
    pooled = results.get("pooled")
    if pooled:
        rows = [r for r in pooled["rows"] if math.isfinite(r["spearman"])]
        if rows:
            best = max(rows, key=lambda r: r["spearman"])
            low_regret = min(rows, key=lambda r: r["mean_regret"])
            out.append({"student": "pooled", "metric": best["metric"], "spearman": best["spearman"],
                        "significant": bool(best["spearman_low"] > 0),
                        "text": f"pooled over {len(pooled['students'])} students: {best['metric']} agrees best "
                                f"(mean Spearman {best['spearman']:.2f} [{best['spearman_low']:.2f}, "
                                f"{best['spearman_high']:.2f}]); lowest mean regret: {low_regret['metric']} "
                                f"({low_regret['mean_regret']:.3g})"})
    return out


def _setting(t, cfg: StudyConfig) -> dict[str, Any]:
    decoding = t.decoding or cfg.generate.decoding
    what = {"file": str(t.responses), "openai": t.remote and t.remote.model}.get(t.backend, t.model)
    return {"teacher": t.name, "backend": t.backend, "model": what,
            "decoding": None if t.backend == "file" else decoding.model_dump()}


def _teacher_rows(rank_teachers, names, outcomes, evaluations, finetunes, primary: str) -> list[dict]:
    by_name = {t["teacher"]: t for t in rank_teachers}
    rows = []
    for name in names:
        row = {k: v for k, v in by_name.get(name, {"teacher": name}).items()}
        for kind, values in outcomes.items():
            row[f"outcome_{kind}"] = values[name]
        row["outcome"] = outcomes[primary][name]
        row["outcome_low"], row["outcome_high"] = _read_interval(primary, evaluations[name])
        final = finetunes[name].get("final") or {}
        row["finetune_steps"] = finetunes[name].get("steps")
        row["finetune_final_loss"] = final.get("loss")
        rows.append(row)
    order = sorted(rows, key=lambda r: -r["outcome"] if math.isfinite(r["outcome"]) else math.inf)
    for rank, row in enumerate(order, 1):
        row["outcome_rank"] = rank
    return rows


def _findings(primary: dict, pairs: list[dict], outcome: str) -> list[str]:
    """Plain sentences on what held: which metric led, and the larger-versus-smaller pairs."""
    out = []
    rows = [r for r in primary.get("correlations", []) if math.isfinite(r["spearman"])]
    if rows:
        best = max(r["spearman"] for r in rows)
        leaders = [r["metric"] for r in rows if r["spearman"] == best]
        car_row = next((r for r in rows if r["metric"] == "car"), None)
        out.append(f"best predictor of {outcome}: {', '.join(leaders)} (Spearman {best:.3f})"
                   + (f"; CAR: {car_row['spearman']:.3f}" if car_row else "; CAR undefined"))
        loo = primary.get("beta_calibration") or {}
        if "corr_loo" in loo:
            out.append(f"beta calibrated on all teachers: {loo['beta_full']:.3g}; CAR with beta chosen by leave-one-out: "
                       f"Spearman {loo['corr_loo']:.3f} (the honest number for a calibrated CAR)")
    for p in pairs:
        if p["better_student_from"] in ("larger", "smaller"):
            out.append(f"{p['larger']} vs {p['smaller']}: the {p['better_student_from']} teacher gave the better student"
                       f" ({p['outcome_larger']:.3f} vs {p['outcome_smaller']:.3f}); CAR was {p['car'] or 'undecided'}")
    return out


def _print_summary(results: dict) -> None:
    for st in results["students"]:
        cols = ["teacher", "car", "reward", "grape", "grace", "outcome", "outcome_rank"]
        console.print(rich_table(st["teachers"], cols, title=f"{st['student_spec']}: teachers; outcome = {st['outcome']}"))
        console.print(rich_table(st["trust"]["rows"], ["metric", "spearman", "spearman_low", "spearman_high", "regret"],
                                 title=f"{st['student_spec']}: correlation with {st['outcome']} over "
                                       f"{st['trust']['n_teachers']} teachers, and the regret of each metric's pick"))
        for note in st["notes"]:
            console.print(f"[yellow]note:[/] {note}")
    for answer in results["answers"]:
        console.print(f"[bold]{answer['text']}[/]")
