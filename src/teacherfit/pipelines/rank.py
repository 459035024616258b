"""`teacherfit rank`: score each teacher's response set for one student with CAR and its baselines.

The sequence, one model in memory at a time:
1. read the response sets and keep the instructions every teacher answered (the rest are reported);
2. the untuned student: loss of each response given its instruction (compatibility L) and without it (IFD);
3. the fixed reference LM: the same two losses (PPL/IFD baselines, the paper's GPT-2 role);
4. the reward source: r per response;
5. per-sample table, per-teacher aggregates with bootstrap intervals, CAR, report.

Every stage's scores are cached in ``scores/`` of the run directory, so a re-run after a crash (or with a
different beta) skips finished stages.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacherfit import metrics
from teacherfit.config import RankConfig, ResponseSetConfig, prepare_run_dir
from teacherfit.data import LoadReport, Record, chat_template_for, load_records, tokenize_example, tokenize_text
from teacherfit.store import atomic_write_bytes, atomic_write_json
from teacherfit.ui import console, progress_bar, rich_table

AGG_METRICS = ["reward", "loss_student", "length", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref"]


@dataclass
class RankResult:
    run_dir: Path
    teachers: list[dict[str, Any]]  # one row per teacher: aggregates, intervals, CAR
    samples: list[dict[str, Any]]  # one row per (teacher, instruction)
    car_variant: str
    notes: list[str]


def response_sets(cfg: RankConfig) -> list[ResponseSetConfig]:
    sets = list(cfg.responses)
    if cfg.generate_run is not None:
        resp_dir = Path(cfg.generate_run) / "responses"
        found = sorted(p for p in resp_dir.glob("*.jsonl") if not p.name.endswith(".partial.jsonl"))
        if not found:
            raise FileNotFoundError(f"no response sets in {resp_dir}")
        sets += [ResponseSetConfig(name=p.stem, path=p) for p in found]
    if len(sets) < 1:
        raise ValueError("rank needs at least one response set (`responses` or `generate_run`)")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"response set names must be unique: {names}")
    return sets


def load_sets(cfg: RankConfig) -> tuple[dict[str, list[Record]], dict[str, LoadReport], list[str]]:
    """Read every set; keep the instruction ids all teachers answered, in the first set's order."""
    reports = {
        s.name: load_records(s.path, format=cfg.format, on_error=cfg.on_error, require_response=True)
        for s in response_sets(cfg)
    }
    for rep in reports.values():
        console.print(rep.summary())
    first = next(iter(reports.values()))
    common = [r.id for r in first.records if all(r.id in {x.id for x in rep.records} for rep in reports.values())]
    if cfg.limit:
        common = common[: cfg.limit]
    if not common:
        raise ValueError("the response sets share no instruction: rank compares teachers on the same instructions")
    keep = set(common)
    by_set = {}
    for name, rep in reports.items():
        index = {r.id: r for r in rep.records if r.id in keep}
        by_set[name] = [index[i] for i in common]
    return by_set, reports, common


def _cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def likelihood_stage(model_spec: str, sets: dict[str, list[Record]], cfg: RankConfig, label: str) -> dict:
    """Per teacher, per sample: loss of the response with and without its instruction under one model."""
    from teacherfit.models import load_model
    from teacherfit.scoring import score_examples

    loaded = load_model(model_spec, device=cfg.models.device, dtype=cfg.models.dtype,
                        trust_remote_code=cfg.models.trust_remote_code)
    tok = loaded.tokenizer
    context = getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_length
    max_length = min(cfg.max_length, context)
    plain = chat_template_for(tok)[1]
    out: dict[str, Any] = {"model": loaded.provenance, "plain_template": plain, "max_length": max_length, "sets": {}}
    total = sum(len(v) for v in sets.values()) * 2
    with progress_bar(f"likelihood under {label}", total) as advance:
        for name, records in sets.items():
            cond = [tokenize_example(tok, r.messages, max_length=max_length) for r in records]
            uncond = [tokenize_text(tok, r.response or "", max_length=max_length) for r in records]
            kw = dict(pad_token_id=tok.pad_token_id, max_tokens=cfg.max_tokens, on_batch=advance)
            sc = score_examples(loaded.model, cond, **kw)
            su = score_examples(loaded.model, uncond, **kw)
            out["sets"][name] = [
                {"loss": c.loss, "loss_uncond": u.loss, "n_tokens": c.n_tokens, "truncated": ex.truncated}
                for c, u, ex in zip(sc, su, cond)
            ]
    del loaded
    gc.collect()
    return out


def reward_stage(sets: dict[str, list[Record]], cfg: RankConfig) -> dict:
    from teacherfit.rewards import make_reward

    reward = make_reward(cfg.reward, cfg.models)
    out: dict[str, Any] = {"reward": reward.provenance(), "sets": {}}
    with progress_bar("reward", sum(len(v) for v in sets.values())) as advance:
        for name, records in sets.items():
            out["sets"][name] = reward.score(records, on_batch=advance)
    out["unparsed"] = getattr(reward, "unparsed", 0)
    del reward
    gc.collect()
    return out


def _finite(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def car_with_interval(rewards: np.ndarray, losses: np.ndarray, beta: float, transform, n_boot: int, seed: int):
    """CAR of the set means, and a paired bootstrap interval over instructions."""
    ok = np.isfinite(rewards) & np.isfinite(losses)
    r, l = rewards[ok], losses[ok]
    point = float(metrics.car(transform(r.mean()), l.mean(), beta))
    if n_boot == 0 or len(r) < 2:
        return point, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(r), size=(n_boot, len(r)))
    boots = np.asarray(metrics.car(transform(r[idx].mean(1)), l[idx].mean(1), beta))
    return point, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def aggregate(samples: list[dict], names: list[str], cfg: RankConfig) -> tuple[list[dict], str]:
    """Per-teacher means with bootstrap intervals, and CAR with the variant the rewards call for."""
    mean_rewards = [float(np.mean(_finite([s["reward"] for s in samples if s["teacher"] == n]))) for n in names]
    variant = metrics.car_variant_for(mean_rewards) if cfg.car_variant == "auto" else cfg.car_variant
    transform = metrics.positive_reward_map(mean_rewards) if variant == "sign_safe" else (lambda x: x)
    rows = []
    for k, name in enumerate(names):
        mine = [s for s in samples if s["teacher"] == name]
        row: dict[str, Any] = {"teacher": name, "n": len(mine)}
        for m in AGG_METRICS:
            vals = _finite([s[m] for s in mine])
            if len(vals) == 0:
                row[m], row[f"{m}_low"], row[f"{m}_high"] = math.nan, math.nan, math.nan
                continue
            est, low, high = (metrics.bootstrap_ci(vals, n_resamples=cfg.bootstrap, seed=cfg.seed + k)
                              if cfg.bootstrap and len(vals) > 1 else (float(vals.mean()), math.nan, math.nan))
            row[m], row[f"{m}_low"], row[f"{m}_high"] = est, low, high
        rewards = np.array([s["reward"] for s in mine], dtype=float)
        losses = np.array([s["loss_student"] for s in mine], dtype=float)
        row["car"], row["car_low"], row["car_high"] = car_with_interval(
            rewards, losses, cfg.beta, transform, cfg.bootstrap, cfg.seed + k)
        row["truncated"] = sum(bool(s["truncated"]) for s in mine)
        row["empty"] = sum(bool(s["empty"]) for s in mine)
        rows.append(row)
    return rows, variant


def build_samples(sets, common, student, ref, rewards) -> list[dict]:
    samples = []
    for name, records in sets.items():
        for k, rec in enumerate(records):
            st = student["sets"][name][k]
            s = {
                "teacher": name,
                "id": rec.id,
                "reward": float(rewards["sets"][name][k]),
                "loss_student": st["loss"],
                "loss_student_uncond": st["loss_uncond"],
                "ppl_student": float(metrics.perplexity(st["loss"])),
                "ifd_student": float(metrics.ifd(st["loss"], st["loss_uncond"])),
                "length": st["n_tokens"],
                "truncated": st["truncated"],
                "empty": not (rec.response or "").strip(),
            }
            if ref is not None:
                rf = ref["sets"][name][k]
                s.update(loss_ref=rf["loss"], loss_ref_uncond=rf["loss_uncond"],
                         ppl_ref=float(metrics.perplexity(rf["loss"])),
                         ifd_ref=float(metrics.ifd(rf["loss"], rf["loss_uncond"])))
            else:
                s.update(loss_ref=math.nan, loss_ref_uncond=math.nan, ppl_ref=math.nan, ifd_ref=math.nan)
            samples.append(s)
    return samples


def per_sample_car(samples: list[dict], beta: float) -> None:
    """CAR of each (instruction, response): lets a later step pick the best-fitting teacher per instruction."""
    rewards = np.array([s["reward"] for s in samples], dtype=float)
    losses = np.array([s["loss_student"] for s in samples], dtype=float)
    finite = rewards[np.isfinite(rewards)]
    if len(finite) and metrics.car_variant_for(finite) == "sign_safe":
        mapped = np.full_like(rewards, np.nan)
        mapped[np.isfinite(rewards)] = metrics.positive_rewards(finite)
        rewards = mapped
    values = metrics.car(np.nan_to_num(rewards, nan=0.0), np.nan_to_num(losses, nan=0.0), beta)
    for s, v, ok in zip(samples, values, np.isfinite(rewards) & np.isfinite(losses)):
        s["car"] = float(v) if ok else math.nan


def write_parquet(path: Path, rows: list[dict]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue())


def preflight(cfg: RankConfig) -> None:
    """Find (and verify) every model before any scoring, so a typo fails in seconds, not after a stage."""
    from teacherfit.models import resolve_model

    for spec in (cfg.student, cfg.reference_lm, cfg.reward.model if cfg.reward.kind != "openai_judge" else None):
        if spec:
            resolve_model(spec)
    if cfg.reward.kind == "openai_judge" and cfg.reward.remote is None:
        raise ValueError("reward.kind 'openai_judge' needs reward.remote (base_url, model)")


def run_rank(cfg: RankConfig) -> RankResult:
    run_dir = prepare_run_dir(cfg, "rank")
    sets, reports, common = load_sets(cfg)
    preflight(cfg)
    names = list(sets)
    notes = []
    for name, rep in reports.items():
        missing = len(rep.records) - len(common)
        if missing > 0:
            notes.append(f"{name}: {missing} responses to instructions not answered by every teacher were left out")
    scores = run_dir / "scores"
    scores.mkdir(exist_ok=True)
    tag = lambda spec: spec.replace("/", "_")  # noqa: E731
    student = _cached(scores / f"student-{tag(cfg.student)}-{cfg.max_length}.json",
                      lambda: likelihood_stage(cfg.student, sets, cfg, "student"))
    if student["plain_template"]:
        notes.append(f"the student {cfg.student} has no chat template: the documented plain template was used")
    ref = None
    if cfg.reference_lm:
        ref = _cached(scores / f"ref-{tag(cfg.reference_lm)}-{cfg.max_length}.json",
                      lambda: likelihood_stage(cfg.reference_lm, sets, cfg, "reference LM"))
    reward_key = cfg.reward.kind + "-" + tag(cfg.reward.model or (cfg.reward.remote.model if cfg.reward.remote else ""))
    rewards = _cached(scores / f"reward-{reward_key}.json", lambda: reward_stage(sets, cfg))
    if rewards.get("unparsed"):
        notes.append(f"{rewards['unparsed']} judge answers could not be parsed (scored NaN, left out of means)")

    samples = build_samples(sets, common, student, ref, rewards)
    per_sample_car(samples, cfg.beta)
    teachers, variant = aggregate(samples, names, cfg)
    notes.append(f"CAR variant: {variant} (beta = {cfg.beta})" + (
        ": some rewards are <= 0, so rewards were mapped to a positive scale across the teachers before dividing"
        if variant == "sign_safe" else ""))
    truncated = sum(bool(s["truncated"]) for s in samples)
    if truncated:
        notes.append(f"{truncated} examples were longer than max_length={student['max_length']} tokens "
                     "and were scored on their first max_length tokens")
    teachers.sort(key=lambda r: -r["car"] if math.isfinite(r["car"]) else math.inf)

    results = {
        "beta": cfg.beta,
        "car_variant": variant,
        "n_instructions": len(common),
        "student": student["model"],
        "reference_lm": ref["model"] if ref else None,
        "reward": rewards["reward"],
        "response_sets": {s.name: str(Path(s.path).resolve()) for s in response_sets(cfg)},
        "load_reports": {n: rep.to_dict() for n, rep in reports.items()},
        "notes": notes,
        "teachers": teachers,
    }
    atomic_write_json(run_dir / "teachers.json", teachers)
    atomic_write_json(run_dir / "results.json", results)
    write_parquet(run_dir / "per_sample.parquet", samples)
    write_parquet(run_dir / "teachers.parquet", teachers)
    from teacherfit.pipelines.reports import rank_report

    rank_report(results, samples).write(run_dir / "report.html")
    columns = ["teacher", "car", "reward", "loss_student", "length", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref"]
    console.print(rich_table(teachers, columns, title=f"teachers for {cfg.student} (CAR {variant}, beta={cfg.beta})"))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"results: {run_dir}")
    return RankResult(run_dir, teachers, samples, variant, notes)
