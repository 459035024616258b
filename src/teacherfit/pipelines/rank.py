"""`teacherfit rank`: score each teacher's response set for one student with CAR and its baselines.

The sequence, one model in memory at a time:
1. read the response sets and keep the instructions every teacher answered (the rest are reported);
2. the untuned student: loss of each response given its instruction (compatibility L) and without it (IFD);
3. the fixed reference LM: the same two losses (PPL/IFD baselines, the paper's GPT-2 role);
4. the reward source: r per response (and a second, different one when `reward_2` is set);
5. GRACE: the untuned student's per-example gradients, projected (the first `grace.instructions` instructions);
6. per-sample table, per-teacher aggregates with bootstrap intervals, CAR, GRAPE's win share, GRACE, report.

Every stage keeps its scores per row in ``scores/<stage>-<digest>.jsonl`` (``store.ResumableJsonl``), keyed
by (teacher, instruction id, digest of the conversation); the digest in the file name covers what the
scores depend on (the model's sha256 or commit, max_length, dtype, the judge prompt version). So a re-run
(or one with another beta) loads no model, an added teacher or an edited response is the only thing
scored, and a run killed mid-stage resumes at the chunk of rows it was on.

Launched as several processes (``accelerate launch -m teacherfit rank`` or torchrun; ``Processes``), each stage
splits the rows still to score: process r scores every world_size-th one from r on, with its own copy of the
model on its own device (cuda:LOCAL_RANK, or the CPU with gloo), into its own ``<stage>-<digest>.rank<r>.jsonl``;
then the main process merges those shards into the stage's file (a key already there wins) and deletes them.
Rows in a shard a killed run left behind count as scored. Only the main process makes and locks the run
directory and writes the results; the others return after the last stage.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from teacherfit import metrics
from teacherfit.config import (
    ConfigError,
    RankConfig,
    ResponseSetConfig,
    config_digest,
    prepare_run_dir,
)
from teacherfit.data import (
    LoadReport,
    Record,
    chat_template_for,
    load_records,
    tokenize_example,
    tokenize_response_alone,
)
from teacherfit.launch import Processes, launched_processes, start_processes
from teacherfit.launch import quiet as quiet_console
from teacherfit.store import (
    ResumableJsonl,
    atomic_write_bytes,
    atomic_write_json,
    sha256_json,
)
from teacherfit.ui import console, progress_bar, rich_table

AGG_METRICS = ["reward", "loss_student", "length", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref", "reward_2"]
# Bump when the way a stage scores a row changes, so that older scores are not reused.
# v2: IFD's unconditional pass scores exactly the conditional pass's response tokens.
SCORES_VERSION = "rank-scores-v2"
GRACE_VERSION = "grace-countsketch-v1"  # the projection (scoring.GradientSketch) and the loss it differentiates
KEY_FIELDS = ("teacher", "id", "content")
ROWS_PER_CHUNK = 64  # rows scored between two appends to a stage's file: the most a killed run loses


@dataclass
class RankResult:
    run_dir: Path
    teachers: list[dict[str, Any]]  # one row per teacher: aggregates, intervals, CAR
    samples: list[dict[str, Any]]  # one row per (teacher, instruction)
    car_variant: str
    notes: list[str]
    plan: list[dict[str, Any]] = field(default_factory=list)  # per stage: model, rows, cached, to score
    results: dict[str, Any] = field(default_factory=dict)  # results.json: the recommendation included


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


def _digest(obj: Any) -> str:
    return sha256_json(obj)[:16]


def row_key(teacher: str, rec: Record) -> tuple[str, str, str]:
    """What a cached score belongs to: the teacher, the instruction and the whole conversation (so an edited
    response is scored again, and a score never moves to another row when files change)."""
    return teacher, rec.id, _digest(rec.messages)


@dataclass
class Stage:
    """One scoring stage; ``spec`` is everything its scores depend on, and its digest names the scores file."""

    name: str  # "student" | "ref" | "reward" | "reward_2" | "grace"
    label: str
    model: str | None  # the model to load (None: a remote judge)
    spec: dict[str, Any]

    def path(self, scores: Path) -> Path:
        return scores / f"{self.name}-{_digest(self.spec)}.jsonl"

    def pin(self, provenance: dict[str, Any]) -> None:
        """Take the commit a hub model actually loaded at (known only after loading) into the spec."""
        model = self.spec.get("model")
        if isinstance(model, dict) and "revision" in model and provenance.get("revision"):
            model["revision"] = provenance["revision"]


def preflight(cfg: RankConfig) -> list[Stage]:
    """Find (and verify) every model before reading the data or scoring, so a typo fails in seconds, not after
    a stage. Nothing is loaded and no GGUF is converted; returns the stages and what their scores depend on."""
    from teacherfit.models import pick_device, pick_dtype, resolve_model
    from teacherfit.rewards import JUDGE_PROMPT_VERSION

    dtype = str(pick_dtype(cfg.models.dtype, pick_device(cfg.models.device))).removeprefix("torch.")

    def likelihood(spec: str) -> dict[str, Any]:
        return {"version": SCORES_VERSION, "model": resolve_model(spec, convert=False).provenance,
                "max_length": cfg.max_length, "dtype": dtype}

    stages = [Stage("student", "student", cfg.student, likelihood(cfg.student))]
    if cfg.reference_lm:
        stages.append(Stage("ref", "reference LM", cfg.reference_lm, likelihood(cfg.reference_lm)))
    for name, label, reward in (("reward", "reward", cfg.reward), ("reward_2", "second reward", cfg.reward_2)):
        if reward is None:
            continue
        if reward.kind != "openai_judge" and not reward.model:
            raise ValueError(f"{name}.kind {reward.kind!r} needs {name}.model")
        spec: dict[str, Any] = {"version": SCORES_VERSION, "kind": reward.kind}
        if reward.kind == "openai_judge":
            spec.update(reward.remote.identity(), prompt=JUDGE_PROMPT_VERSION)
        else:
            spec.update(model=resolve_model(reward.model, convert=False).provenance, max_length=reward.max_length,
                        dtype=dtype)
            if reward.kind == "judge":
                spec["prompt"] = JUDGE_PROMPT_VERSION
        stages.append(Stage(name, label, reward.model if reward.kind != "openai_judge" else None, spec))
    if cfg.reward_2 is not None and stages[-1].spec == stages[-2].spec:
        raise ConfigError("reward_2 is the same reward source as reward: give a different judge or model (it is "
                          "there to separate the selection signal from the evaluation signal), or unset it")
    if cfg.grace.enabled:
        g = cfg.grace
        stages.append(Stage("grace", "GRACE gradients", cfg.student, {
            **likelihood(cfg.student), "version": GRACE_VERSION, "dim": g.dim, "seed": g.seed}))
    return stages


Scorer = Callable[[list[Record], Callable[..., None]], list[dict[str, Any]]]


def likelihood_scorer(model_spec: str, cfg: RankConfig, device: str | None = None) -> tuple[dict, Scorer, Any]:
    """Loss of each response with its instruction (CAR's L, PPL) and without it (IFD) under one model.

    Both passes score the same tokens: the unconditional pass is the conditional pass's labelled ids after
    one start token, so IFD compares like with like for every template and tokenizer.
    """
    from teacherfit.models import load_model
    from teacherfit.scoring import context_of, score_padded

    loaded = load_model(model_spec, device=device or cfg.models.device, dtype=cfg.models.dtype,
                        trust_remote_code=cfg.models.trust_remote_code)
    tok = loaded.tokenizer
    context = context_of(loaded.model) or cfg.max_length
    max_length = min(cfg.max_length, context)
    meta = {"model": loaded.provenance, "plain_template": chat_template_for(tok)[1], "max_length": max_length}

    def score(records: list[Record], advance) -> list[dict[str, Any]]:
        cond = [tokenize_example(tok, r.messages, max_length=max_length) for r in records]
        uncond = [tokenize_response_alone(tok, ex) for ex in cond]
        kw = dict(pad_token_id=tok.pad_token_id, max_tokens=cfg.max_tokens, on_batch=advance, cap=context)
        sc, su = score_padded(loaded.model, cond, **kw), score_padded(loaded.model, uncond, **kw)
        return [{"loss": c.loss, "loss_uncond": u.loss, "n_tokens": c.n_tokens, "truncated": ex.truncated}
                for c, u, ex in zip(sc, su, cond)]

    return meta, score, loaded


def gradient_scorer(model_spec: str, cfg: RankConfig, device: str | None = None) -> tuple[dict, Scorer, Any]:
    """GRACE's input: the untuned student's gradient on each (instruction, response), projected to
    ``grace.dim`` numbers (``scoring.GradientSketch``); the example tokenized as for the student's loss."""
    from teacherfit.models import load_model
    from teacherfit.scoring import GradientSketch, context_of

    loaded = load_model(model_spec, device=device or cfg.models.device, dtype=cfg.models.dtype,
                        trust_remote_code=cfg.models.trust_remote_code)
    tok, model = loaded.tokenizer, loaded.model
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()  # no dropout: the gradient of the weights as they are
    max_length = min(cfg.max_length, context_of(model) or cfg.max_length)
    sketch = GradientSketch(model, cfg.grace.dim, cfg.grace.seed)
    meta = {"model": loaded.provenance, "dim": cfg.grace.dim, "weights": sketch.n_weights, "max_length": max_length}

    def score(records: list[Record], advance) -> list[dict[str, Any]]:
        out = []
        for r in records:
            ex = tokenize_example(tok, r.messages, max_length=max_length)
            grad = sketch.project(ex.input_ids, ex.labels) if ex.n_response_tokens else [math.nan] * cfg.grace.dim
            out.append({"grad": grad})
            advance(1, len(ex.input_ids))
        return out

    return meta, score, (loaded, sketch)


def reward_scorer(cfg: RankConfig, device: str | None = None, processes: int = 1,
                  reward_cfg=None) -> tuple[dict, Scorer, Any]:
    """``device``: this process's device; ``processes``: how many share the rows (a remote judge's requests in
    flight are shared out too, so that all of them together keep to ``remote.concurrency``); ``reward_cfg``:
    the reward source (default ``cfg.reward``)."""
    from teacherfit.rewards import make_reward

    reward_cfg, models = reward_cfg or cfg.reward, cfg.models
    if reward_cfg.kind == "openai_judge" and processes > 1:
        each = max(1, -(-reward_cfg.remote.concurrency // processes))
        remote = reward_cfg.remote.model_copy(update={"concurrency": each})
        reward_cfg = reward_cfg.model_copy(update={"remote": remote})
    if device is not None:
        models = models.model_copy(update={"device": device})
    reward = make_reward(reward_cfg, models)

    def score(records: list[Record], advance) -> list[dict[str, Any]]:
        return [{"reward": float(v)} for v in reward.score(records, on_batch=advance)]

    return {"reward": reward.provenance()}, score, reward


def shard_path(path: Path, rank: int) -> Path:
    """Process ``rank``'s own file of a stage's rows, beside the stage's file."""
    return path.with_name(f"{path.stem}.rank{rank}.jsonl")


def shard_paths(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))


def _read_rows(path: Path) -> list[dict]:
    """The rows of a whole scores file, read without opening it for writing."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cached_keys(path: Path) -> set[tuple]:
    """Keys of the rows a scores file and its processes' shards hold, read without opening them for writing (for
    a dry run)."""
    keys = set()
    for one in [path, *shard_paths(path)]:
        if not one.exists():
            continue
        for line in one.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                keys.add(tuple(row[f] for f in KEY_FIELDS))
            except (ValueError, KeyError, TypeError):  # a torn last line: repaired when the stage opens the file
                continue
    return keys


def _scored_keys(path: Path) -> set[tuple]:
    """Keys of the rows in a stage's file (a torn last line cut away first)."""
    with ResumableJsonl(path, KEY_FIELDS) as store:
        return store.done_keys()


def merge_shards(path: Path) -> int:
    """Move the rows of the processes' shards of ``path`` into it, once per key (a key already in ``path``, or in
    an earlier shard, wins); the shards are deleted once the merged file is on disk. Returns the rows added.
    One writer: the main process, while no other process writes."""
    shards = shard_paths(path)
    if not shards:
        return 0
    have = _scored_keys(path)
    new = []
    for shard in shards:
        with ResumableJsonl(shard, KEY_FIELDS) as store:  # a killed process's torn last line is cut
            for row in store.rows():
                key = store.key_of(row)
                if key not in have:
                    have.add(key)
                    new.append(row)
    if new:  # the whole file replaced atomically: the old one or the merged one, never a half
        atomic_write_bytes(path, path.read_bytes()
                           + "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in new).encode("utf-8"))
    for shard in shards:
        shard.unlink()
    return len(new)


def run_stage(stage: Stage, sets: dict[str, list[Record]], cfg: RankConfig, scores: Path,
              procs: Processes | None = None) -> tuple[dict, dict]:
    """Every row's scores for one stage: rows on disk are reused; the rest are scored ``ROWS_PER_CHUNK`` at a
    time, each chunk appended (fsynced) as it finishes. Returns (stage meta, {(teacher, id): row}).

    With several processes (``procs``) the rows to score are split (process r takes every world-th one from
    r on), each process appends to its own shard, and the main process merges the shards after a barrier; every
    process returns the merged rows. The main process decides what is to score and broadcasts it."""
    procs = procs or Processes()
    rows = [(name, rec, row_key(name, rec)) for name, records in sets.items() for rec in records]

    def missing(path: Path) -> list[int]:
        done = _scored_keys(path)
        return [k for k, row in enumerate(rows) if row[2] not in done]

    need = todo = None
    if procs.main:
        merge_shards(stage.path(scores))  # rows that the processes of a killed run scored count as done
        todo = missing(stage.path(scores))
        need = bool(todo) or not stage.path(scores).with_suffix(".meta.json").exists()
    if procs.from_main(need):
        if procs.world > 1:
            if procs.main and stage.model is not None:
                from teacherfit.models import resolve_model

                resolve_model(stage.model)  # a GGUF is converted once, here, before every process loads it
            procs.barrier()
        if stage.name in ("student", "ref"):
            meta, score, held = likelihood_scorer(stage.model, cfg, procs.device)
        elif stage.name == "grace":
            meta, score, held = gradient_scorer(stage.model, cfg, procs.device)
        else:
            meta, score, held = reward_scorer(cfg, procs.device, procs.world, getattr(cfg, stage.name))
        if procs.main:
            before = stage.path(scores)
            stage.pin(meta.get("model") or meta["reward"])
            if stage.path(scores) != before:  # the hub commit loaded is not the one the cache held
                merge_shards(stage.path(scores))
                todo = missing(stage.path(scores))
            atomic_write_json(stage.path(scores).with_suffix(".meta.json"), meta)
        stage.spec, todo = procs.from_main((stage.spec, todo))
        path = stage.path(scores)
        mine = todo[procs.rank :: procs.world]
        if procs.world > 1:
            console.print(f"process {procs.rank} of {procs.world}: {stage.label}: {len(mine)} of {len(todo)} rows "
                          "to score", highlight=False)
        store = ResumableJsonl(path if procs.world == 1 else shard_path(path, procs.rank), KEY_FIELDS)
        try:
            passes = 2 if stage.name in ("student", "ref") else 1
            label = stage.label if procs.world == 1 else f"{stage.label} (process {procs.rank})"
            with progress_bar(f"{label}: {len(mine)} rows to score", passes * len(mine)) as advance:
                for at in range(0, len(mine), ROWS_PER_CHUNK):
                    chunk = [rows[k] for k in mine[at : at + ROWS_PER_CHUNK]]
                    for (name, rec, key), values in zip(chunk, score([rec for _, rec, _ in chunk], advance)):
                        store.append({"teacher": name, "id": rec.id, "content": key[2], **values})
        finally:
            store.close()
        del held, score
        from teacherfit.models import release_memory

        release_memory()
    path = stage.path(scores)
    if procs.world > 1:
        procs.barrier()  # every process's rows are in its shard
        if procs.main:
            merge_shards(path)
        procs.barrier()  # the merged file is on disk
    done = {tuple(row[f] for f in KEY_FIELDS): row for row in _read_rows(path)}
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    return meta, {(name, rec.id): done[key] for name, rec, key in rows}


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


def reward_transform(samples: list[dict], names: list[str], cfg: RankConfig, key: str = "reward"):
    """The CAR variant the teachers' mean rewards (``key``: reward or reward_2) call for, and the reward map it
    applies (identity when plain)."""
    mean_rewards = [float(np.mean(_finite([s[key] for s in samples if s["teacher"] == n]))) for n in names]
    variant = metrics.car_variant_for(mean_rewards) if cfg.car_variant == "auto" else cfg.car_variant
    transform = metrics.positive_reward_map(mean_rewards) if variant == "sign_safe" else (lambda x: x)
    return variant, transform


def recommend(samples: list[dict], names: list[str], cfg: RankConfig, transform, beta_is_default: bool) -> dict[str, Any]:
    """Which teacher to use, how sure (paired bootstrap over instructions), or that the data support no pick.
    ``transform``: the reward map of the CAR variant (``reward_transform``), as the point CARs use."""
    ids = sorted({s["id"] for s in samples})
    col = {i: k for k, i in enumerate(ids)}
    rewards = np.full((len(names), len(ids)), np.nan)
    losses = np.full((len(names), len(ids)), np.nan)
    row = {n: k for k, n in enumerate(names)}
    for s in samples:
        rewards[row[s["teacher"]], col[s["id"]]] = s["reward"]
        losses[row[s["teacher"]], col[s["id"]]] = s["loss_student"]
    out: dict[str, Any] = {"confidence": cfg.pick_confidence, "beta_is_default": beta_is_default}
    if len(names) < 2:
        return {**out, "teacher": names[0] if names else None, "supported": bool(names), "p_beats_runner_up": None,
                "runner_up": None, "p_best": {n: 1.0 for n in names},
                "text": "only one teacher was ranked: nothing to choose between"}
    picked = metrics.car_pick_probabilities(rewards, losses, cfg.beta, transform=transform,
                                            n_resamples=max(cfg.bootstrap, 200), seed=cfg.seed)
    leader, runner = names[picked["leader"]], names[picked["runner_up"]]
    p = picked["p_leader_beats_runner_up"]
    supported = p >= cfg.pick_confidence
    if supported:
        text = (f"use {leader}: its CAR beats the runner-up {runner} in {p:.0%} of {picked['n_resamples']} paired "
                f"bootstrap resamples of the {len(ids)} instructions")
    else:
        text = (f"no pick is supported: {leader} leads, but beats the runner-up {runner} in only {p:.0%} of "
                f"{picked['n_resamples']} paired bootstrap resamples of the {len(ids)} instructions (a pick needs "
                f"{cfg.pick_confidence:.0%}); rank more instructions, or train on the per-instruction best "
                "(data.best_of_rank)")
    return {**out, "teacher": leader, "runner_up": runner, "p_beats_runner_up": p, "supported": supported,
            "p_best": dict(zip(names, picked["p_best"])), "text": text}


def next_commands(cfg: RankConfig, run_dir: Path, pick: dict[str, Any], sets_paths: dict[str, str]) -> list[str]:
    """The commands that act on the ranking: distill the chosen teacher's responses, or the per-instruction best."""
    from shlex import quote as q

    student = cfg.student
    out = []
    if pick.get("teacher"):
        name = pick["teacher"]
        out.append(f"teacherfit distill --student {q(student)} --responses {q(f'{name}={sets_paths[name]}')} "
                   f"--set kd.lambda=0 --out {q(f'runs/distill-{name}')}")
    out.append(f"teacherfit distill --student {q(student)} --set data.best_of_rank={q(str(run_dir))} --set kd.lambda=0")
    if pick.get("beta_is_default"):
        out.append(f"teacherfit correlate --rank-run {q(str(run_dir))} --outcomes OUTCOMES.csv")
    return out


def aggregate(samples: list[dict], names: list[str], cfg: RankConfig, transform) -> list[dict]:
    """Per-teacher means with bootstrap intervals, and CAR with ``transform``, the reward map of the CAR variant."""
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
    return rows


def grace_sets(sets: dict[str, list[Record]], cfg: RankConfig) -> dict[str, list[Record]]:
    """The rows GRACE scores: every teacher's responses to the first ``grace.instructions`` common instructions."""
    n = cfg.grace.instructions
    return {name: records[:n] if n else records for name, records in sets.items()}


def add_set_metrics(teachers: list[dict], samples: list[dict], names: list[str], cfg: RankConfig,
                    grace_stage: tuple[dict, dict] | None, notes: list[str]) -> dict[str, Any] | None:
    """The per-teacher metrics computed from a whole set at once, into ``teachers``' rows: GRAPE's win share (the
    share of instructions where the student finds this teacher's response the most likely per token), CAR under
    the second reward, and GRACE from the projected gradients. Returns GRACE's settings for the results."""
    ids = list(dict.fromkeys(s["id"] for s in samples))
    col, row_of = {i: k for k, i in enumerate(ids)}, {n: k for k, n in enumerate(names)}
    logprob = np.full((len(names), len(ids)), np.nan)
    for s in samples:
        logprob[row_of[s["teacher"]], col[s["id"]]] = -s["loss_student"]
    grape = metrics.grape_selection(logprob)
    by_name = {t["teacher"]: t for t in teachers}
    for name in names:
        by_name[name]["grape"] = grape["win_share"][row_of[name]]
        by_name[name]["grape_wins"] = int(sum(w == row_of[name] for w in grape["winner"]))
    if cfg.reward_2 is not None:  # CAR of the mean reward_2, with the variant and map reward_2 calls for
        _, transform = reward_transform(samples, names, cfg, "reward_2")
        for name in names:
            row = by_name[name]
            row["car_2"] = float(metrics.car(transform(row["reward_2"]), row["loss_student"], cfg.beta))
    else:
        for name in names:
            by_name[name]["reward_2"] = by_name[name]["car_2"] = math.nan
    if grace_stage is None:
        for name in names:
            by_name[name]["grace"] = math.nan
        return None
    meta, rows = grace_stage
    g = cfg.grace
    used = {}
    for name in names:
        grads = [rows[name, i]["grad"] for i in ids if (name, i) in rows]  # the stage's rows: grace_sets
        grads = np.asarray([x for x in grads if np.all(np.isfinite(x))], dtype=float)
        used[name] = len(grads)
        try:
            by_name[name]["grace"] = metrics.grace_score(grads, test_fraction=g.test_fraction, n_splits=g.n_splits,
                                                         smooth=g.smooth)
        except ValueError as err:
            by_name[name]["grace"] = math.nan
            notes.append(f"GRACE of {name}: not computed ({err})")
    return {"model": meta.get("model"), "dim": g.dim, "weights": meta.get("weights"), "seed": g.seed,
            "test_fraction": g.test_fraction, "n_splits": g.n_splits, "smooth": g.smooth, "examples": used,
            "projection": "CountSketch (sparse JL) of the full gradient of the mean token loss"}


def build_samples(sets: dict[str, list[Record]], student: dict, ref: dict | None, rewards: dict,
                  rewards2: dict | None = None) -> list[dict]:
    """One row per (teacher, instruction) from the stages' rows, which are keyed by (teacher, id)."""
    samples = []
    for name, records in sets.items():
        for rec in records:
            st = student[name, rec.id]
            s = {
                "teacher": name,
                "id": rec.id,
                "reward": float(rewards[name, rec.id]["reward"]),
                "reward_2": float(rewards2[name, rec.id]["reward"]) if rewards2 is not None else math.nan,
                "loss_student": st["loss"],
                "loss_student_uncond": st["loss_uncond"],
                "ppl_student": float(metrics.perplexity(st["loss"])),
                "ifd_student": float(metrics.ifd(st["loss"], st["loss_uncond"])),
                "length": st["n_tokens"],
                "truncated": st["truncated"],
                "empty": not (rec.response or "").strip(),
            }
            if ref is not None:
                rf = ref[name, rec.id]
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


def plan_rank(cfg: RankConfig, stages: list[Stage], sets: dict[str, list[Record]], notes: list[str]) -> RankResult:
    """What a run would score, per stage, counting the rows a previous run in the same directory already scored."""
    run_dir = Path(cfg.out or Path("runs") / f"rank-{config_digest(cfg)}").resolve()
    plan = []
    for stage in stages:
        rows = [row_key(name, rec) for name, records in (grace_sets(sets, cfg) if stage.name == "grace" else sets).items()
                for rec in records]
        cached = _cached_keys(stage.path(run_dir / "scores"))
        plan.append({"stage": stage.label, "model": stage.model or stage.spec.get("model"), "rows": len(rows),
                     "cached": sum(k in cached for k in rows), "to score": sum(k not in cached for k in rows)})
    console.print(f"rank --dry-run (nothing loaded): {len(sets)} teachers x {len(next(iter(sets.values())))} instructions, "
                  f"run directory {run_dir}")
    for p in plan:
        console.print(f"  {p['stage']} ({p['model']}): {p['rows']} rows, {p['cached']} cached, "
                      f"{p['to score']} to score")
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    return RankResult(run_dir, [], [], "", notes, plan)


TERMINAL_COLUMNS = {"teacher": "teacher", "car": "CAR", "p_best": "P(best)", "reward": "reward",
                    "loss_student": "L", "grape": "GRAPE", "grace": "GRACE", "length": "len"}


def print_ranking(results: dict[str, Any], run_dir: Path, out=None) -> None:
    """The terminal summary: a table that fits 80 columns (full names, never cut), the pick, notes, next steps."""
    out = out or console
    pick = results["recommendation"]
    rows = [{TERMINAL_COLUMNS[k]: row.get(k) for k in TERMINAL_COLUMNS} for row in results["teachers"]]
    title = f"teachers for {results['student'].get('model')} (CAR {results['car_variant']}, beta={results['beta']})"
    out.print(rich_table(rows, list(TERMINAL_COLUMNS.values()), title=title, float_fmt="{:.3g}", compact=True))
    out.print(f"[bold]{'pick' if pick['supported'] else 'no pick'}:[/] {pick['text']}", soft_wrap=False)
    for note in results["notes"]:
        out.print(f"[yellow]note:[/] {note}")
    out.print(f"report: {run_dir / 'report.html'} (every metric with 95% intervals, per-sample text)")
    out.print("next:")
    for command in pick["next"]:
        out.print(f"  {command}", soft_wrap=True, highlight=False, markup=False)


def sample_texts(sets: dict[str, list[Record]]) -> dict[tuple[str, str], tuple[str, str]]:
    """(teacher, id) -> (instruction, response) text, for the report's per-sample rows."""
    texts = {}
    for name, records in sets.items():
        for rec in records:
            prompt = "\n".join(m["content"] for m in rec.prompt if m["role"] == "user")
            texts[name, rec.id] = (prompt, rec.response or "")
    return texts


def run_rank(cfg: RankConfig, dry_run: bool = False) -> RankResult:
    """Rank the teachers; ``dry_run`` runs every check that needs no weights, prints the plan and returns.

    Launched as several processes, they share the scoring (``run_stage``); only the main process makes the run
    directory and writes the results, and the others return a result with no teachers after the last stage."""
    world = launched_processes()
    if world > 1 and cfg.reward.device_map is not None:
        raise ConfigError(f"reward.device_map={cfg.reward.device_map!r} spreads one reward model over every visible "
                          f"GPU from one process, but {world} processes were launched (accelerate launch / torchrun): "
                          "run rank as one process, or unset reward.device_map")
    procs = start_processes(cfg.models) if world > 1 and not dry_run else Processes()
    quiet = int(os.environ.get("RANK", "0") or 0) != 0  # the main process reports
    with procs.main_first(), quiet_console(quiet):
        stages = preflight(cfg)
        sets, reports, common = load_sets(cfg)
    rows_digest = _digest([row_key(name, rec) for name, records in sets.items() for rec in records])
    if procs.from_main(rows_digest) != rows_digest:  # the processes split rows by position: the same rows, each
        raise ValueError("the response sets changed while the processes of this run read them; run rank again")
    names = list(sets)
    notes = []
    for name, rep in reports.items():
        missing = len(rep.records) - len(common)
        if missing > 0:
            notes.append(f"{name}: {missing} responses to instructions not answered by every teacher were left out")
    if dry_run:
        with quiet_console(quiet):
            return plan_rank(cfg, stages, sets, notes)
    run_dir = None
    if procs.main:  # one process makes and locks the run directory; the others wait for it here
        run_dir = prepare_run_dir(cfg, "rank")
        (run_dir / "scores").mkdir(exist_ok=True)
    run_dir = procs.from_main(run_dir)
    scores = run_dir / "scores"
    results_of = {stage.name: run_stage(stage, grace_sets(sets, cfg) if stage.name == "grace" else sets, cfg, scores,
                                        procs) for stage in stages}
    procs.close()
    if not procs.main:
        return RankResult(run_dir, [], [], "", notes)
    student_meta, student = results_of["student"]
    if student_meta["plain_template"]:
        notes.append(f"the student {cfg.student} has no chat template: the documented plain template was used")
    ref_meta, ref = results_of.get("ref", (None, None))
    reward_meta, rewards = results_of["reward"]
    reward2_meta, rewards2 = results_of.get("reward_2", (None, None))
    samples = build_samples(sets, student, ref, rewards, rewards2)
    unscored = sum(not math.isfinite(s["reward"]) for s in samples)
    if unscored:
        notes.append(f"{unscored} rewards are NaN (judge answers that could not be parsed) and are left out of means")
    per_sample_car(samples, cfg.beta)
    variant, transform = reward_transform(samples, names, cfg)
    teachers = aggregate(samples, names, cfg, transform)
    grace_meta = add_set_metrics(teachers, samples, names, cfg, results_of.get("grace"), notes)
    notes.append(f"CAR variant: {variant} (beta = {cfg.beta})" + (
        ": some rewards are <= 0, so rewards were mapped to a positive scale across the teachers before dividing"
        if variant == "sign_safe" else ""))
    truncated = sum(bool(s["truncated"]) for s in samples)
    if truncated:
        notes.append(f"{truncated} examples were longer than max_length={student_meta['max_length']} tokens "
                     "and were scored on their first max_length tokens")
    teachers.sort(key=lambda r: -r["car"] if math.isfinite(r["car"]) else math.inf)
    pick = recommend(samples, names, cfg, transform, beta_is_default="beta" not in cfg.model_fields_set)
    for row in teachers:
        row["p_best"] = pick["p_best"].get(row["teacher"], math.nan)
    if pick["beta_is_default"]:
        notes.append(f"beta = {cfg.beta} is the uncalibrated default, not a measured value: CAR's trade-off between "
                     "reward and student loss is a placeholder until `teacherfit correlate` (or a study) calibrates "
                     "beta on teachers whose outcome you know")
    set_paths = {s.name: str(Path(s.path).resolve()) for s in response_sets(cfg)}
    pick["next"] = next_commands(cfg, run_dir, pick, set_paths)

    results = {
        "beta": cfg.beta,
        "car_variant": variant,
        "n_instructions": len(common),
        "student": student_meta["model"],
        "reference_lm": ref_meta["model"] if ref_meta else None,
        "reward": reward_meta["reward"],
        "reward_2": reward2_meta["reward"] if reward2_meta else None,
        "grace": grace_meta,
        "response_sets": set_paths,
        "recommendation": pick,
        "load_reports": {n: rep.to_dict() for n, rep in reports.items()},
        "notes": notes,
        "teachers": teachers,
    }
    atomic_write_json(run_dir / "teachers.json", teachers)
    atomic_write_json(run_dir / "results.json", results)
    write_parquet(run_dir / "per_sample.parquet", samples)
    write_parquet(run_dir / "teachers.parquet", teachers)
    from teacherfit.pipelines.reports import rank_report

    rank_report(results, samples, texts=sample_texts(sets)).write(run_dir / "report.html")
    print_ranking(results, run_dir)
    return RankResult(run_dir, teachers, samples, variant, notes, results=results)
