"""What on-policy distillation buys, at equal wall time, on CPU.

Teacher: the packaged SmolLM2-135M-Instruct; student: its half-depth copy (``student_init: {layers: every_other}``,
15 of 30 layers, the teacher's own weights). Three arms, each trained by the product's own entry point
(``teacherfit.pipelines.distill.run_distill`` on a ``DistillConfig`` from ``load_config``), identical but for
``kd.on_policy``:

- ``off_policy`` (``kd.on_policy=0``): logit KD on the dataset's responses (the teacher's own greedy answers);
- ``on_policy`` (``kd.on_policy=1``): every row's response is sampled by the live student (``rollout``:
  transformers engine, temperature 1, whole distribution, ``--max-new-tokens``) and the teacher's distribution is
  matched on it;
- ``mixed`` (``kd.on_policy=0.5``): half of each step's rows sampled, half from the dataset.

All arms: ``kd.lambda=1`` (no ground-truth CE), ``kd.w_attn=0`` (logit KD only), the same divergence
(``--divergence``, forward KL by default: the paper's, and *not* the quantity measured below, so the on-policy arms
are not favoured by optimising the metric itself), the same learning rate, batch, warm-up (0), seed and
``train.max_length`` (384, the quickstart's: the dataset's responses, mostly 256 tokens, are kept whole, while a
rollout is at most ``--max-new-tokens``; equal wall time, not equal tokens, is what the arms share).

Equal wall time: each arm first runs ``--calib-steps`` optimizer steps in a calibration run (``calib/<arm>``);
its seconds per step (the log's ``elapsed_s`` differences, the first step left out) give the arm
``train.max_steps = round(--budget-s / seconds per step)``. The table reports the steps each arm got and the real
training seconds (the training loop's ``elapsed_s``, summed over resumed segments; model loading and the final
save excluded).

Data: the quickstart's SmolLM2-135M-Instruct response set (20 ShareGPT prompts, the teacher's greedy answers,
256 new tokens). The package holds only 20 such prompts, so the held-out set (``--heldout`` prompts, default 12)
is the 8 other ShareGPT prompts the package ships (``dae/routing_labelled.jsonl``, ``domain: false``: in no
response set, never trained on) plus ``--heldout - 8`` prompts split off the response set (seeded), which are
then left out of training. ``data/train.jsonl`` and ``data/heldout.jsonl`` in ``--root`` are what was used.

Outcomes on the held-out prompts, for the untrained half-depth student and each arm's saved model (and the
teacher's reward, for scale):

1. Reverse KL to the teacher on the student's own samples: the student samples ``--samples`` responses per prompt
   (temperature 1, the whole distribution: ``TransformersGenerator`` samples with ``top_k=0``, as rollouts do;
   ``--max-new-tokens``, fixed seed); for each, per token ``log p_S(y_t) - log p_T(y_t)`` under
   both models (full forward passes), averaged over the response's tokens (the stop token included when sampled),
   then over the prompt's samples; the mean over prompts with a 95% percentile bootstrap interval over prompts
   (``teacherfit.metrics.bootstrap_ci``). The JSON also has the exact per-position reverse KL at the same
   tokens (sum over the vocabulary: the same quantity, lower variance).
2. The judge's reward for greedy answers (``--answer-tokens`` new tokens): ``teacherfit.rewards`` ``LocalJudgeReward``
   built by ``make_reward`` as ``rank`` builds it (Qwen2.5-Coder-0.5B-Instruct, probability-weighted 1-10 rating,
   ``max_length`` 768 as in the quickstart); mean with a 95% bootstrap interval. Caveat, measured on this
   machine with the quickstart's answers: the 0.5B judge rates ChatGPT's answers 6.1-7.1, word salad 6.9-7.4 and
   an empty answer 6.8-7.5, so it hardly tells a broken student from a good one; Qwen2.5-Coder-1.5B-Instruct
   (``--judge qwen2.5-coder-1.5b-instruct``, about 2.5x slower) rates the same 7.6-7.9, 3.1-3.4 and 6.5-7.4.

Paired differences against the off-policy arm (same prompts, resampled together) are in the JSON and printed
under the table.

Resumable: a calibration run with its log, an arm whose run directory holds a finished model (``summary.json``,
``model/``) and a model's evaluation (``eval/<name>.json``, keyed by the evaluation settings and the model file)
are skipped on a re-run with the same ``--root``; an interrupted arm resumes from its last checkpoint through
``run_distill``. ``plan.json`` keeps the calibration and the steps, so a re-run trains the same schedule.

    python benchmarks/study_on_policy.py                                   # the full study (~25 min quiet, 2 cores)
    python benchmarks/study_on_policy.py --markdown                        # and a Markdown table for the docs
    python benchmarks/study_on_policy.py --budget-s 10 --heldout 2 --max-new-tokens 8 --samples 1 \\
        --answer-tokens 8 --calib-steps 2 --root /tmp/study-smoke         # smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import load_line, machine_line, markdown_table, print_table

ARMS: dict[str, float] = {"off_policy": 0.0, "on_policy": 1.0, "mixed": 0.5}
BASELINE_ARM = "off_policy"  # paired differences are taken against it
UNTRAINED, TEACHER = "untrained", "teacher"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_JUDGE = "qwen2.5-coder-0.5b-instruct"
RESPONSE_SET = "responses/smollm2-135m-instruct.jsonl"  # under the quickstart assets
EXTRA_PROMPTS = "dae/routing_labelled.jsonl"  # its `domain: false` rows: ShareGPT prompts no response set holds
MIN_TRAIN = 8  # training rows kept at least
EVAL_VERSION = 2  # 2: evaluation samples from the whole distribution (top_k 0)
START = time.perf_counter()


def say(message: str) -> None:
    minutes, seconds = divmod(int(time.perf_counter() - START), 60)
    print(f"[{minutes:02d}:{seconds:02d}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("runs/study-on-policy"),
                    help="study directory: data, calibration runs, arms, evaluations (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: ROOT/results.json)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default: all)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="teacher; the student is its half-depth copy "
                    "(default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="training seconds per arm: each arm's max_steps is this over its calibrated seconds per "
                    "step (default: %(default)s)")
    ap.add_argument("--calib-steps", type=int, default=4,
                    help="optimizer steps of each arm's calibration run (the first is left out of the timing when "
                    "there are two or more; default: %(default)s)")
    ap.add_argument("--heldout", type=int, default=12,
                    help="held-out prompts: the package's 8 untrained-on ShareGPT prompts first, the rest split off "
                    "the training response set (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="rollout.max_new_tokens in training, and the length of the evaluation samples (default: "
                    "%(default)s)")
    ap.add_argument("--divergence", choices=["forward_kl", "reverse_kl"], default="forward_kl",
                    help="kd.divergence of every arm (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="train.lr (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="train.batch_size (default: %(default)s)")
    ap.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=384,
                    help="train.max_length, tokens per training example (the quickstart's; default: %(default)s)")
    ap.add_argument("--checkpoint-every", type=int, default=25,
                    help="train.checkpoint_every; the writes count in the training seconds (default: %(default)s)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished arm's last checkpoint (about 1 GB each; default: removed)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed, the held-out split, sampling (default: 0)")
    ap.add_argument("--samples", type=int, default=4,
                    help="student samples per held-out prompt for the reverse KL (default: %(default)s)")
    ap.add_argument("--answer-tokens", type=int, default=128,
                    help="new tokens of the greedy answers the judge rates (default: %(default)s)")
    ap.add_argument("--judge", default=DEFAULT_JUDGE, help="local judge model (default: %(default)s)")
    ap.add_argument("--judge-max-length", type=int, default=768,
                    help="judge input tokens kept (the quickstart's; default: %(default)s)")
    ap.add_argument("--no-judge", action="store_true", help="skip the judge (reward columns empty)")
    ap.add_argument("--no-teacher-row", action="store_true", help="do not rate the teacher's own greedy answers")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="models.device (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.calib_steps < 1 or args.budget_s <= 0 or args.samples < 1 or args.heldout < 1:
        ap.error("--calib-steps, --budget-s, --samples and --heldout must be positive")
    args.out = args.out or args.root / "results.json"
    return args


def write_json(path: Path, value: Any) -> None:
    from teacherfit.store import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, value)


# ---------------------------------------------------------------- data


def split_data(args) -> tuple[Path, Path, dict[str, Any]]:
    """``data/train.jsonl`` (the response set's rows not held out, as shipped) and ``data/heldout.jsonl`` (prompts)."""
    from teacherfit.data import Record, load_records
    from teacherfit.pipelines.quickstart import ASSETS

    lines = [line for line in (ASSETS / RESPONSE_SET).read_text().splitlines() if line.strip()]
    records = load_records(ASSETS / RESPONSE_SET).records
    assert len(records) == len(lines), "one record per line expected in the packaged response set"
    extra = [json.loads(line) for line in (ASSETS / EXTRA_PROMPTS).read_text().splitlines() if line.strip()]
    extra = [row for row in extra if not row.get("domain")]
    from_extra = min(args.heldout, len(extra))
    from_set = args.heldout - from_extra
    if len(records) - from_set < MIN_TRAIN:
        raise SystemExit(f"--heldout {args.heldout}: the package has {len(extra)} untrained-on prompts and "
                         f"{len(records)} in the response set; at most {len(extra) + len(records) - MIN_TRAIN} "
                         f"can be held out and leave {MIN_TRAIN} to train on")
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    held_idx = sorted(order[:from_set])
    heldout = [Record.from_messages([{"role": "user", "content": row["text"]}],
                                    meta={"source_id": row.get("source"), "from": EXTRA_PROMPTS})
               for row in extra[:from_extra]]
    heldout += [Record.from_messages([dict(m) for m in records[i].prompt],
                                     meta={"source_id": records[i].meta.get("source_id"), "from": RESPONSE_SET})
                for i in held_idx]
    train_lines = [line for i, line in enumerate(lines) if i not in set(held_idx)]
    data = args.root / "data"
    train_file, heldout_file = data / "train.jsonl", data / "heldout.jsonl"
    info = {"train_rows": len(train_lines), "heldout_prompts": len(heldout), "heldout_from_extra": from_extra,
            "heldout_from_response_set": from_set, "train_file": str(train_file), "heldout_file": str(heldout_file)}
    check_plan(args, info)  # before anything is written: a study's trained arms keep the data they were trained on
    data.mkdir(parents=True, exist_ok=True)
    train_file.write_text("\n".join(train_lines) + "\n")
    heldout_file.write_text("".join(json.dumps(r.to_row(), ensure_ascii=False) + "\n" for r in heldout))
    return train_file, heldout_file, info


# ---------------------------------------------------------------- training


def arm_config(args, train_file: Path, share: float, out: Path, max_steps: int, checkpoint_every: int):
    from teacherfit.config import DistillConfig, load_config

    return load_config(DistillConfig, None, [
        f"student={args.model}", f"teacher={args.model}", "student_init={layers: every_other}",
        f"data.responses=[{{name: {args.model}, path: {json.dumps(str(train_file.resolve()))}}}]",
        "kd.lambda=1", "kd.w_pred=1", "kd.w_attn=0", "kd.temperature=1", f"kd.divergence={args.divergence}",
        f"kd.on_policy={share}",
        "rollout.engine=transformers", f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1",
        "rollout.top_p=1",
        f"train.lr={args.lr}", f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}",
        f"train.max_steps={max_steps}", "train.warmup_steps=0", f"train.max_length={args.max_length}",
        f"train.seed={args.seed}", f"train.checkpoint_every={checkpoint_every}", "train.keep_checkpoints=1",
        f"models.device={args.device}", f"out={json.dumps(str(out.resolve()))}"])


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def step_seconds(log: list[dict]) -> list[float]:
    """Each step's seconds from the log's ``elapsed_s`` (the clock restarts when a run resumes)."""
    out, previous = [], 0.0
    for row in log:
        elapsed = float(row["elapsed_s"])
        out.append(elapsed - previous if elapsed >= previous else elapsed)
        previous = elapsed
    return out


def finished(run_dir: Path, steps: int) -> dict | None:
    """The run's summary when it finished ``steps`` steps and its model is there."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists() or not (run_dir / "model" / "model.safetensors").exists():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("steps") != steps or (run_dir / "failed.json").exists():
        return None
    return summary


def distill(cfg) -> tuple[dict, float]:
    """``run_distill`` as the CLI runs it (the run directory released after, ``failed.json`` on an error)."""
    from teacherfit.config import finish_runs
    from teacherfit.models import release_memory
    from teacherfit.pipelines.distill import run_distill

    clock = time.perf_counter()
    try:
        summary = run_distill(cfg, resume=True)
    except BaseException as err:
        finish_runs(error=f"{type(err).__name__}: {err}")
        raise
    finish_runs()
    release_memory()
    return summary, time.perf_counter() - clock


def calibrate(args, arm: str, train_file: Path) -> dict[str, Any]:
    run_dir = args.root / "calib" / arm
    log = read_log(run_dir) if (run_dir / "summary.json").exists() else []  # a finished calibration run
    if len(log) < args.calib_steps:
        say(f"calibrating {arm}: {args.calib_steps} steps")
        cfg = arm_config(args, train_file, ARMS[arm], run_dir, args.calib_steps, args.calib_steps)
        distill(cfg)
        log = read_log(run_dir)
    for big in ("checkpoints", "model"):  # only the log is needed
        shutil.rmtree(run_dir / big, ignore_errors=True)
    seconds = step_seconds(log[: args.calib_steps])
    timed = seconds[1:] if len(seconds) > 1 else seconds
    per_step = float(np.mean(timed))
    return {"seconds_per_step": round(per_step, 3), "step_seconds": [round(s, 3) for s in seconds],
            "max_steps": max(1, round(args.budget_s / per_step))}


def plan_settings(args, data_info: dict) -> dict[str, Any]:
    keys = ("model", "budget_s", "calib_steps", "heldout", "max_new_tokens", "divergence", "lr", "batch_size",
            "grad_accum", "max_length", "checkpoint_every", "seed", "device")
    return {**{k: getattr(args, k) for k in keys}, "train_rows": data_info["train_rows"]}


def check_plan(args, data_info: dict) -> dict[str, Any]:
    """The study's plan (``plan.json``): new, or the existing one when it was made with the same settings."""
    plan_path = args.root / "plan.json"
    settings = plan_settings(args, data_info)
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {"settings": settings, "arms": {}}
    if plan["settings"] != settings:
        changed = {k: (plan["settings"].get(k), v) for k, v in settings.items() if plan["settings"].get(k) != v}
        raise SystemExit(f"{args.root} holds a study planned with other settings ({changed}); give another --root, "
                         "or remove that directory")
    return plan


def train_arms(args, train_file: Path, data_info: dict) -> dict[str, dict[str, Any]]:
    plan_path = args.root / "plan.json"
    plan = check_plan(args, data_info)
    for arm in args.arms:
        if arm not in plan["arms"]:
            plan["arms"][arm] = calibrate(args, arm, train_file)
            write_json(plan_path, plan)
        c = plan["arms"][arm]
        say(f"{arm}: {c['seconds_per_step']:.2f} s/step calibrated -> {c['max_steps']} steps for "
            f"{args.budget_s:g} s")

    results = {}
    for arm in args.arms:
        steps = plan["arms"][arm]["max_steps"]
        run_dir = args.root / "arms" / arm
        summary = finished(run_dir, steps)
        record_path = run_dir / "study-arm.json"
        if summary is None:
            say(f"training {arm} (kd.on_policy={ARMS[arm]:g}): {steps} steps")
            cfg = arm_config(args, train_file, ARMS[arm], run_dir, steps, args.checkpoint_every)
            summary, wall = distill(cfg)
            write_json(record_path, {"wall_s": round(wall, 1), "resumed_from": summary.get("resumed_from", 0)})
        else:
            say(f"{arm}: finished model in {run_dir}, not retrained")
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log = read_log(run_dir)
        seconds = step_seconds(log)
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        rollout_s = sum(float(r.get("rollout_s", 0.0)) for r in log)
        results[arm] = {
            "on_policy": ARMS[arm], "steps": summary["steps"], "train_s": round(sum(seconds), 1),
            "seconds_per_step": round(sum(seconds) / max(1, len(seconds)), 3),
            "calibrated_seconds_per_step": plan["arms"][arm]["seconds_per_step"],
            "rollout_s": round(rollout_s, 1), "trained_tokens": int(sum(r.get("tokens", 0) for r in log)),
            "rollout_tokens": int(sum(r.get("rollout_tokens", 0) for r in log)),
            "wall_s": record.get("wall_s"), "model_dir": summary["model_dir"], "run_dir": str(run_dir),
            "first_kd": (summary.get("first") or {}).get("kd"), "final_kd": (summary.get("final") or {}).get("kd"),
        }
    return results


# ---------------------------------------------------------------- evaluation


def load_student(args, name: str, model_dir: str | None):
    """The untrained half-depth copy (``shrink_layers``, as ``build_student`` builds it), or a saved arm."""
    from teacherfit.config import StudentInit
    from teacherfit.models import load_model
    from teacherfit.pipelines.recipe import shrink_layers

    if name == UNTRAINED:
        loaded = load_model(args.model, device=args.device, dtype="float32")
        shrink_layers(loaded.model, StudentInit(layers="every_other"))
        loaded.model.eval()
        return loaded
    return load_model(model_dir, device=args.device, dtype="float32")


def generate(loaded, prompts: list[list[dict]], *, n: int, max_new_tokens: int, temperature: float, seed: int):
    from teacherfit.config import DecodingConfig
    from teacherfit.generation import TransformersGenerator

    runner = TransformersGenerator(loaded, batch_size=max(1, 32 // n))
    decoding = DecodingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    out: list[list] = [[] for _ in prompts]
    for i, completions in runner.generate(prompts, decoding):
        out[i] = completions
    return out


@torch.inference_mode()
def log_ratios(student, teacher, device, pairs: list[tuple[list[int], list[int]]], pad_id: int,
               batch: int = 8) -> list[dict[str, float] | None]:
    """Per response ``y`` after prompt ``p``: the mean over its tokens of log p_S(y_t) - log p_T(y_t) (the sampled
    estimate), of the exact per-position KL(p_S || p_T), and of log p_S(y_t); full forward passes, right-padded."""
    import torch.nn.functional as F

    from teacherfit.models import decoder_of
    from teacherfit.scoring import lm_head_logits

    out: list[dict[str, float] | None] = [None] * len(pairs)
    order = sorted((i for i, (_, y) in enumerate(pairs) if y), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        h_s = decoder_of(student)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        h_t = decoder_of(teacher)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for row, i in enumerate(chunk):
            prompt, response = pairs[i]
            where = slice(len(prompt) - 1, len(prompt) + len(response) - 1)  # positions that predict the response
            ls = F.log_softmax(lm_head_logits(student, h_s[row, where]).double(), -1)
            lt = F.log_softmax(lm_head_logits(teacher, h_t[row, where]).double(), -1)
            target = torch.tensor(response, device=ls.device)[:, None]
            lp_s, lp_t = ls.gather(1, target)[:, 0], lt.gather(1, target)[:, 0]
            exact = (ls.exp() * (ls - lt)).sum(-1)
            out[i] = {"sampled": float((lp_s - lp_t).mean()), "exact": float(exact.mean()),
                      "logp_student": float(lp_s.mean()), "tokens": len(response)}
    return out


def eval_settings(args) -> dict[str, Any]:
    return {"version": EVAL_VERSION, "model": args.model, "heldout": args.heldout, "seed": args.seed,
            "samples": args.samples, "max_new_tokens": args.max_new_tokens, "answer_tokens": args.answer_tokens}


def model_key(name: str, model_dir: str | None) -> dict[str, Any]:
    if model_dir is None:
        return {"name": name}
    weights = Path(model_dir) / "model.safetensors"
    stat = weights.stat()
    return {"name": name, "model_dir": str(model_dir), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def evaluate(args, heldout_file: Path, arms: dict[str, dict]) -> dict[str, dict]:
    from teacherfit.data import load_records, tokenize_prompt
    from teacherfit.models import load_model, release_memory

    prompts = [r.prompt for r in load_records(heldout_file).records]
    settings = eval_settings(args)
    models: dict[str, str | None] = {UNTRAINED: None, **{a: arms[a]["model_dir"] for a in arms}}
    if not args.no_teacher_row:
        models = {TEACHER: None, **models}
    paths = {name: args.root / "eval" / f"{name}.json" for name in models}
    evals: dict[str, dict] = {}
    for name, model_dir in models.items():
        key = {"settings": settings, "model": model_key(name, model_dir)}
        if paths[name].exists():
            cached = json.loads(paths[name].read_text())
            if cached.get("key") == key:
                evals[name] = cached
                continue
        evals[name] = {"key": key}

    todo = [name for name in models if "answers" not in evals[name]]
    if todo:
        say(f"loading the teacher {args.model}")
        teacher = load_model(args.model, device=args.device, dtype="float32")
        tok = teacher.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        prompt_ids = [tokenize_prompt(tok, p) for p in prompts]
        for name in todo:
            clock = time.perf_counter()
            entry = evals[name]
            loaded = teacher if name == TEACHER else load_student(args, name, models[name])
            if name != TEACHER:
                samples = generate(loaded, prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                                   temperature=1.0, seed=args.seed)
                pairs = [(prompt_ids[i], list(c.token_ids or [])) for i in range(len(prompts)) for c in samples[i]]
                scored = log_ratios(loaded.model, teacher.model, loaded.device, pairs, pad_id)
                per_prompt = []
                for i in range(len(prompts)):
                    mine = [s for s in scored[i * args.samples : (i + 1) * args.samples] if s is not None]
                    per_prompt.append({
                        "sampled": float(np.mean([s["sampled"] for s in mine])) if mine else float("nan"),
                        "exact": float(np.mean([s["exact"] for s in mine])) if mine else float("nan"),
                        "tokens": float(np.mean([len(c.token_ids or []) for c in samples[i]])),
                        "stopped": float(np.mean([c.finish_reason == "stop" for c in samples[i]])),
                        "first_sample": samples[i][0].text})
                entry["reverse_kl"] = per_prompt
            answers = generate(loaded, prompts, n=1, max_new_tokens=args.answer_tokens, temperature=0.0,
                               seed=args.seed)
            entry["answers"] = [{"text": a[0].text, "tokens": a[0].completion_tokens,
                                 "finish_reason": a[0].finish_reason} for a in answers]
            entry["eval_s"] = round(time.perf_counter() - clock, 1)
            write_json(paths[name], entry)
            say(f"evaluated {name}: {entry['eval_s']:.0f} s")
            if loaded is not teacher:
                del loaded
                release_memory()
        del teacher
        release_memory()

    judge_key = {"model": args.judge, "max_length": args.judge_max_length}
    unjudged = [name for name in models if "rewards" not in evals[name] or evals[name].get("judge_key") != judge_key]
    if unjudged and not args.no_judge:
        from teacherfit.config import ModelOptions, RewardConfig
        from teacherfit.data import Record
        from teacherfit.rewards import make_reward

        say(f"loading the judge {args.judge}")
        judge = make_reward(RewardConfig(kind="judge", model=args.judge, max_length=args.judge_max_length),
                            ModelOptions(device=args.device))
        for name in unjudged:
            clock = time.perf_counter()
            records = [Record.from_messages([dict(m) for m in p] + [{"role": "assistant", "content": a["text"]}])
                       for p, a in zip(prompts, evals[name]["answers"])]
            evals[name]["rewards"] = [float(v) for v in judge.score(records)]
            evals[name]["judge"] = judge.provenance()
            evals[name]["judge_key"] = judge_key
            evals[name]["judge_s"] = round(time.perf_counter() - clock, 1)
            write_json(paths[name], evals[name])
            say(f"judged {name}: {evals[name]['judge_s']:.0f} s")
        del judge
        release_memory()
    return evals


# ---------------------------------------------------------------- results


def interval(values, args) -> dict[str, float] | None:
    from teacherfit import metrics

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return None
    if v.size == 1:
        return {"mean": float(v[0]), "low": float("nan"), "high": float("nan"), "n": 1}
    mean, low, high = metrics.bootstrap_ci(v, n_resamples=args.bootstrap, seed=args.seed)
    return {"mean": mean, "low": low, "high": high, "n": int(v.size)}


def paired(a, b, args) -> dict[str, float] | None:
    """Mean of a - b over the prompts both have, with the bootstrap interval of the prompts resampled together."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    return interval(diffs, args)


def summarise(args, data_info: dict, arms: dict[str, dict], evals: dict[str, dict]) -> dict[str, Any]:
    rows = {}
    for name, entry in evals.items():
        rkl = entry.get("reverse_kl")
        rows[name] = {
            **({k: v for k, v in arms[name].items()} if name in arms else {}),
            "reverse_kl": interval([p["sampled"] for p in rkl], args) if rkl else None,
            "reverse_kl_exact": interval([p["exact"] for p in rkl], args) if rkl else None,
            "sample_tokens": float(np.mean([p["tokens"] for p in rkl])) if rkl else None,
            "sample_stopped": float(np.mean([p["stopped"] for p in rkl])) if rkl else None,
            "reward": interval(entry["rewards"], args) if entry.get("rewards") else None,
            "judge": entry.get("judge_key"),
            "answer_tokens": float(np.mean([a["tokens"] for a in entry["answers"]])),
            "eval_s": entry.get("eval_s"), "judge_s": entry.get("judge_s"),
            "per_prompt": {"reverse_kl": [p["sampled"] for p in rkl] if rkl else None,
                           "reverse_kl_exact": [p["exact"] for p in rkl] if rkl else None,
                           "reward": entry.get("rewards")},
        }
    differences: dict[str, dict] = {}
    for ref in (BASELINE_ARM, UNTRAINED):
        if ref not in rows:
            continue
        for name in arms:
            if name == ref:
                continue
            a, b = rows[name]["per_prompt"], rows[ref]["per_prompt"]
            differences[f"{name} - {ref}"] = {
                "reverse_kl": paired(a["reverse_kl"], b["reverse_kl"], args) if a["reverse_kl"] else None,
                "reverse_kl_exact": paired(a["reverse_kl_exact"], b["reverse_kl_exact"], args)
                if a["reverse_kl_exact"] else None,
                "reward": paired(a["reward"], b["reward"], args) if a["reward"] and b["reward"] else None}
    return {
        "study": "on-policy distillation at equal wall time",
        "machine": machine_line(), "load_after": load_line(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": data_info, "models": rows, "differences": differences,
        "notes": [("reverse_kl: per token log p_S(y) - log p_T(y) on the student's own samples (temperature 1), "
                   "mean per response, then over the prompt's samples; interval: 95% percentile bootstrap over "
                   "prompts"),
                  "reverse_kl_exact: the exact per-position KL(p_S || p_T) at the same sampled tokens",
                  "reward: judge's probability-weighted 1-10 rating of greedy answers",
                  "train_s: the training loop's seconds (log elapsed_s), model loading and final save excluded"],
    }


def fmt_ci(ci: dict | None, digits: int = 3) -> str:
    if ci is None:
        return "-"
    if not np.isfinite(ci["low"]):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def table_rows(results: dict) -> list[dict]:
    out = []
    for name, row in results["models"].items():
        out.append({
            "model": name,
            "on_policy": "-" if "on_policy" not in row else f"{row['on_policy']:g}",
            "steps": row.get("steps", 0) if name in ARMS else "-",
            "train s": row["train_s"] if name in ARMS else "-",
            "s/step": f"{row['seconds_per_step']:.2f}" if name in ARMS else "-",
            "reverse KL [95% CI]": "0 (itself)" if name == TEACHER else fmt_ci(row["reverse_kl"]),
            "sample tokens": "-" if row["sample_tokens"] is None else f"{row['sample_tokens']:.1f}",
            "reward [95% CI]": fmt_ci(row["reward"], 2),
        })
    return out


def print_results(results: dict, markdown: bool) -> None:
    columns = ["model", "on_policy", "steps", "train s", "s/step", "reverse KL [95% CI]", "sample tokens",
               "reward [95% CI]"]
    rows = table_rows(results)
    print()
    print(f"held-out prompts: {results['data']['heldout_prompts']}, training rows: {results['data']['train_rows']}")
    print_table(rows, columns)
    if results["differences"]:
        print()
        print("paired differences (same prompts; 95% bootstrap interval):")
        for what, d in results["differences"].items():
            print(f"  {what:28s} reverse KL {fmt_ci(d['reverse_kl']):32s} reward {fmt_ci(d['reward'], 2)}")
    if markdown:
        print()
        print(markdown_table(rows, columns))


def main(argv=None) -> int:
    import os

    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(load_line())
    load_before = load_line()
    if os.getloadavg()[0] > 1.5:
        print("warning: the machine is busy; the calibrated seconds per step, and so the steps each arm gets, "
              "follow the load of the moment (the table reports the real seconds)")
    train_file, heldout_file, data_info = split_data(args)
    say(f"data: {data_info['train_rows']} training rows, {data_info['heldout_prompts']} held-out prompts "
        f"({data_info['heldout_from_extra']} never in a response set, {data_info['heldout_from_response_set']} "
        "split off the training set)")
    arms = train_arms(args, train_file, data_info)
    evals = evaluate(args, heldout_file, arms)
    results = summarise(args, data_info, arms, evals)
    results["load_before"] = load_before
    write_json(args.out, results)
    print_results(results, args.markdown)
    print()
    print(load_line())
    say(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
