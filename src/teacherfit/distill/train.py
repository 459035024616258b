"""The distillation training runtime: one loop for `distill` and `align`, built on accelerate.

The loop is in view: ``Trainer.step`` (the public training step, also what ``benchmarks/bench_distill.py``
times) takes ``grad_accum`` micro-batches, computes the loss terms as *sums*, divides them by the real token counts
of the whole step (across micro-batches and processes), backpropagates with gradient sync on the last micro-batch,
clips, steps AdamW and the cosine schedule. The data order is a pure function of (seed, epoch), so a resumed run
sees exactly the batches the uninterrupted run would have seen.

Memory: the student's LM head and the KD loss run over chunks of response tokens inside
``DistillModule.forward`` (so FSDP2 and DeepSpeed see one module), attention maps only for mapped layers in query
chunks; the teacher runs frozen in inference mode (sharded like the student when the launch shards), or is
replaced by the offline top-k cache.

Teachers answer with a typed signal (``distill.teachers``): routes of rows, each with its teacher's targets.
`distill` is one route over every row; DAE (`align`) routes domain rows to the expert and the others to the
reference model, and ``DistillModule`` runs the student once and the head loss once per route.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from teacherfit.config import AlignConfig, DistillConfig, KDConfig, TrainOptions
from teacherfit.distill.attention import AttentionCapture, attention_kd_sums
from teacherfit.distill.examples import Micro, TrainExample, collate
from teacherfit.distill.losses import chunked_head_losses
from teacherfit.distill.teachers import HeadSignal, Route, Teacher, TeacherSignal
from teacherfit.launch import wait_for_everyone
from teacherfit.models import decoder_of, output_head, trim_heap
from teacherfit.scoring import active_post_head, text_config
from teacherfit.store import atomic_write_json, atomic_write_text, flatten
from teacherfit.ui import console, progress_bar

LOG_FILE = "log.jsonl"
CKPT_DIR = "checkpoints"


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or inf; the run stopped and the last good checkpoint is kept."""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a pure function of (seed, epoch), so resuming needs no sampler state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class Schedule:
    """Which examples each micro-batch of each optimizer step holds, for this process.

    An epoch is every example once: ``ceil(n / batch_size)`` micro-batches (the last one may be smaller) in
    ``steps_per_epoch = ceil(micro-batches / (grad_accum * world))`` optimizer steps, and the last step of an
    epoch takes only the epoch's remaining micro-batches (the loop normalises by the step's real tokens, so a
    short step is an unbiased step). No step mixes two epochs, so ``epochs`` whole epochs see each example
    exactly ``epochs`` times; ``total_steps = round(epochs * steps_per_epoch)`` (at least 1) for fractional
    epochs, or ``max_steps``. With several processes the last step of an epoch needs a micro-batch for every
    process, and the same number on every process: an epoch's last ``short % world`` micro-batches are left out.
    """

    def __init__(self, n_examples: int, opts: TrainOptions, world: int = 1, rank: int = 0):
        self.n, self.opts, self.world, self.rank = n_examples, opts, world, rank
        self.per_step = opts.grad_accum * world
        micro = math.ceil(n_examples / opts.batch_size)
        # every process runs the same number of micro-batches in every step: DDP syncs once per step, and FSDP2
        # and ZeRO-3 gather weights in every forward, so a process with one forward more would wait forever.
        # An epoch's short last step is cut to a multiple of ``world`` (at most world - 1 micro-batches left out)
        micro -= (micro % self.per_step) % world
        if micro < world:  # zero included: trimming can leave nothing for the other processes
            raise ValueError(f"{n_examples} training examples at batch_size={opts.batch_size} make "
                             f"{math.ceil(n_examples / opts.batch_size)} micro-batches, too few for {world} "
                             "processes in a step: lower train.batch_size or use fewer processes")
        self.micro_per_epoch = max(1, micro)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.per_step)
        self.total_steps = opts.max_steps or max(1, round(opts.epochs * self.steps_per_epoch))

    def step(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.per_step
        positions = range(first, min(first + self.per_step, self.micro_per_epoch))
        order = epoch_order(self.n, self.opts.seed, epoch)
        size = self.opts.batch_size
        return [order[pos * size : (pos + 1) * size] for i, pos in enumerate(positions) if i % self.world == self.rank]


class DistillModule(nn.Module):
    """The student plus the whole loss, so that wrappers (DDP, FSDP2, DeepSpeed) see a single forward.

    The teacher's signal comes as routes (``distill.teachers``): the student runs once, then the fused head
    loss runs once per route on that route's rows against that route's teacher. Routes partition the rows, so
    the per-route CE sums add up to the batch's CE (each token once) and the KD sums to the sum over tokens of
    D(p* || p_S), p* the row's teacher; ``parts`` keeps each route's KD sum for the log (several routes only).
    """

    def __init__(self, student: nn.Module, kd: KDConfig, *, vocab: int | None, layer_map: dict[int, int] | None,
                 capture: AttentionCapture | None):
        super().__init__()
        self.student = student
        self.kd = kd
        self.weights = kd.weights()
        self.vocab = vocab
        self.layer_map = layer_map
        self.capture = capture
        self.post_head = active_post_head(student)
        # read from the config, never from the weight (a ZeRO-3 partition holds no rows on this process)
        self.head_chunk = kd.chunk_for(vocab or text_config(student.config).vocab_size)
        # FSDP2's transformer-layer wrapping reads the wrapped model's layer classes
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                signal: TeacherSignal | None = None) -> dict[str, Any]:
        if self.capture is not None:
            self.capture.clear()
        hidden = decoder_of(self.student)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        routes = signal.routes if signal is not None and signal.routes else [Route("teacher", None, None)]
        total: dict[str, Any] = {}
        parts: dict[str, Tensor] = {}
        for route in routes:
            if route.rows is not None and route.rows.numel() == 0:
                parts[f"kd_{route.name}"] = torch.zeros((), device=hidden.device)
                continue
            if route.rows is None:
                h, y = hidden, labels
            else:
                rows = route.rows.to(hidden.device)
                h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
            sums = self._head_sums(h, y, route.signal)
            parts[f"kd_{route.name}"] = sums["kd_sum"].detach()
            for key in ("loss_sum", "kd_sum", "ce_sum", "n_tokens"):
                total[key] = total[key] + sums[key] if key in total else sums[key]
        if not total:
            raise ValueError("no routed rows in a micro-batch: every row needs a route")
        if len(routes) > 1:
            total["parts"] = parts
        attention = routes[0].signal.attention if len(routes) == 1 and routes[0].signal is not None else None
        if self.capture is not None and attention is not None:
            attn_sum, attn_count = attention_kd_sums(
                self.capture, attention, self.layer_map, labels != -100,
                head_map=self.kd.head_map, query_chunk=self.kd.query_chunk,
            )
            total["attn_sum"], total["attn_count"] = attn_sum, attn_count
        return total

    def _head_sums(self, hidden: Tensor, labels: Tensor, signal: HeadSignal | None) -> dict[str, Any]:
        signal = signal or HeadSignal()
        return chunked_head_losses(
            hidden[:, :-1],
            output_head(self.student, self.vocab),
            labels[:, 1:],
            teacher_hidden=None if signal.hidden is None else signal.hidden[:, :-1],
            teacher_head=signal.head,
            teacher_topk=signal.topk,
            teacher_sampled=signal.sampled,
            divergence=self.kd.divergence,
            divergence_kwargs={**self.kd.divergence_kwargs, **(signal.divergence_kwargs or {})} or None,
            temperature=self.kd.temperature,
            chunk_size=self.head_chunk,
            post_head=self.post_head,
            teacher_post_head=signal.post_head,
            kd_weight=self.weights.pred,
            ce_weight=self.weights.ce,
            fused=self.kd.fused_head,
        )


class Trainer:
    """Everything an optimizer step needs, prepared by accelerate: ``step`` is the public training step that the
    loop (``train``) and the benchmark (``benchmarks/bench_distill.py``) both call.

    One step takes the micro-batches of this process, computes each one's loss terms as sums, divides them by the
    real token counts of the whole step (across micro-batches and processes), backpropagates with gradient sync
    on the last micro-batch only (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``, DeepSpeed's
    accumulation boundary: accelerate's ``sync_gradients``), clips the prepared parameters, steps AdamW and the
    cosine schedule once. ``accelerator.backward`` divides by ``gradient_accumulation_steps`` (DeepSpeed inside
    its engine) and the data-parallel reduction averages over processes, so the loss is scaled back by both:
    the gradient is that of the step's global mean.
    """

    def __init__(self, accelerator, module: DistillModule, optimizer, scheduler, teacher: Teacher | None,
                 kd: KDConfig, opts: TrainOptions, *, attn_on: bool):
        self.accelerator, self.module, self.optimizer, self.scheduler = accelerator, module, optimizer, scheduler
        self.teacher, self.kd, self.opts, self.attn_on = teacher, kd, opts, attn_on
        self.weights = module.weights if isinstance(module, DistillModule) else kd.weights()
        self.needs_teacher = kd.lambda_ > 0 and (kd.w_pred > 0 or attn_on)
        if self.needs_teacher and teacher is None:
            raise ValueError("KD terms are on (kd.lambda > 0) but no teacher or teacher_cache was given")
        self.loss_scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
        self.distribution = distribution_of(accelerator, module, teacher)

    def module_capture(self) -> AttentionCapture | None:
        return self.accelerator.unwrap_model(self.module).capture

    def step(self, micros: list[Micro], *, on_diverged: Callable[[str, int, Micro], Exception] | None = None
             ) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; the log row's numbers (global means)."""
        acc, device = self.accelerator, self.accelerator.device
        counts = torch.tensor([sum(m.loss_tokens for m in micros), sum(m.query_tokens for m in micros)],
                              dtype=torch.float64, device=device)
        tokens_global, queries_global = acc.reduce(counts, "sum").tolist()
        totals = {"ce": 0.0, "kd": 0.0, "attn": 0.0}
        parts: dict[str, float] = {}  # per-route KD (align), same normalisation as kd
        for k, micro in enumerate(micros):
            last = k == len(micros) - 1
            acc.sync_gradients = last  # DeepSpeed's accumulation boundary; the optimizer steps after the last
            signal = self.teacher(micro) if (self.teacher is not None and self.needs_teacher) else None
            with contextlib.nullcontext() if last else acc.no_sync(self.module):
                sums = self.module(micro.input_ids.to(device), micro.attention_mask.to(device),
                                   micro.labels.to(device), signal)
                terms = {"ce": sums["ce_sum"] / tokens_global, "kd": sums["kd_sum"] / tokens_global}
                if self.attn_on and "attn_sum" in sums:
                    # mean over (layer, head, response query) of the whole step: this micro-batch's mean,
                    # weighted by its share of the step's response queries
                    terms["attn"] = sums["attn_sum"] / max(sums["attn_count"], 1) * (micro.query_tokens / queries_global)
                for name, value in terms.items():
                    if not torch.isfinite(value):
                        if on_diverged is not None:
                            raise on_diverged(name, k, micro)
                        raise TrainingDiverged(f"non-finite {name} loss at micro-batch {k} (examples {micro.keys})")
                # loss_sum = w.ce * ce_sum + w.pred * kd_sum, differentiable; the attention term is added here
                loss = sums["loss_sum"] / tokens_global
                if "attn" in terms:
                    loss = loss + self.weights.attn * terms["attn"]
                acc.backward(loss * self.loss_scale)
            for name, value in terms.items():
                totals[name] += float(value.detach())
            for name, value in sums.get("parts", {}).items():
                parts[name] = parts.get(name, 0.0) + float(value) / tokens_global
        # each process holds its share of the step's global means: add them up for the log
        names = ["ce", "kd", "attn"] + sorted(parts)  # every process has the same route names
        summed = acc.reduce(torch.tensor([totals.get(n, parts.get(n)) for n in names], dtype=torch.float64,
                                         device=device), "sum")
        totals = dict(zip(names, summed.tolist()))
        # the prepared parameters (FSDP2 replaces them with sharded ones); DeepSpeed clips inside its engine
        grad_norm = acc.clip_grad_norm_(self.module.parameters(), self.opts.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cpu":
            trim_heap()
        row = {"loss": self.weights.total(totals["ce"], totals["kd"], totals["attn"]), "ce": totals["ce"],
               "kd": totals["kd"], "attn": totals["attn"], "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "tokens": int(tokens_global)}
        row.update({n: totals[n] for n in sorted(parts)})
        return row


def distribution_of(accelerator, module: nn.Module, teacher: Teacher | None) -> dict[str, Any]:
    """How this run is really spread (for summary.json and the tests that prove it): the launcher, the processes,
    the share of the student's parameters this process holds (1/world under FSDP2 / ZeRO-3), whether the teacher
    is sharded."""
    from torch.distributed.tensor import DTensor

    from teacherfit.launch import requested_distribution

    local = total = 0
    for p in module.parameters():
        if isinstance(p, DTensor):
            local, total = local + p.to_local().numel(), total + p.numel()
        elif hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partition
            local, total = local + p.ds_tensor.numel(), total + p.ds_numel
        else:
            local, total = local + p.numel(), total + p.numel()
    teachers = getattr(teacher, "teachers", None)
    members = list(teachers.values()) if isinstance(teachers, dict) else [teacher]
    return {"launch": requested_distribution(), "type": str(accelerator.distributed_type.value),
            "processes": accelerator.num_processes, "student_share": round(local / max(total, 1), 4),
            "teacher_sharded": any(getattr(t, "collective", False) for t in members if t is not None)}


def build_trainer(cfg: DistillConfig | AlignConfig, accelerator, student: nn.Module,
                  teacher_factory: Callable[[Any], Teacher | None], *, vocab: int | None,
                  layer_map: dict[int, int] | None, total_steps: int) -> Trainer:
    """The student wrapped with its loss, optimizer and schedule prepared by ``accelerator``, then the teacher
    (built after the student is placed: on ``accelerator.device``, sharded like the student when it is)."""
    from transformers import get_cosine_schedule_with_warmup

    opts, kd = cfg.train, cfg.kd
    attn_on = bool(kd.w_attn > 0 and kd.lambda_ > 0 and layer_map)
    if opts.gradient_checkpointing:
        if attn_on:
            raise ValueError("train.gradient_checkpointing cannot be combined with attention KD (the captured maps "
                             "would be recorded again during recomputation): set kd.w_attn=0 or turn it off")
        enable_gradient_checkpointing(student)
    capture = AttentionCapture(student, list(layer_map)) if attn_on else None
    module = DistillModule(student, kd, vocab=vocab, layer_map=layer_map if attn_on else None, capture=capture)
    # AdamW over the trainable parameters, with weight decay on matrices only; prepare may replace the parameters
    # (FSDP2's DTensors): accelerate maps the optimizer's groups onto them
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer([{"params": [p for p in params if p.ndim >= 2], "weight_decay": opts.weight_decay},
                                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=opts.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(opts.warmup_steps, total_steps), total_steps)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    teacher = teacher_factory(accelerator)
    return Trainer(accelerator, module, optimizer, scheduler, teacher, kd, opts, attn_on=attn_on)

def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (transformers' own, non-reentrant)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def make_optimizer(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (one pass over each parameter; CPU and CUDA), else the default."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(groups, lr=lr)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    log: list[dict] = field(default_factory=list)
    model_dir: Path | None = None
    resumed_from: int = 0
    seconds: float = 0.0
    distribution: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The run's part of a command's summary.json: where, how long, and the first and last log rows."""
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "steps": self.steps,
                "resumed_from": self.resumed_from, "seconds": round(self.seconds, 2),
                "distribution": self.distribution,
                "first": self.log[0] if self.log else None, "final": self.log[-1] if self.log else None}


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CKPT_DIR
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in _checkpoints(run_dir) if (p / "state.json").exists()]
    return done[-1] if done else None


def teacher_unscored(teacher) -> int | None:
    """How many loss tokens a teacher behind a server could not score so far (None: not such a teacher)."""
    stats = getattr(teacher, "stats", None)
    return stats.get("unscored_tokens") if isinstance(stats, dict) else None


def rollout_row(accelerator, rollout: dict[str, float]) -> dict[str, float]:
    """A step's on-policy numbers for the log, over every process: the share of rows the student answered
    itself, the tokens it sampled, the seconds generation took (the slowest process) and the rollouts' age in
    optimizer steps (0: sampled from this step's weights)."""
    summed = accelerator.reduce(torch.tensor([rollout["rollout_rows"], rollout["rows"], rollout["rollout_tokens"]],
                                             dtype=torch.float64, device=accelerator.device), "sum").tolist()
    slowest = accelerator.reduce(torch.tensor([rollout["rollout_s"]], dtype=torch.float64,
                                              device=accelerator.device), "max").item()
    return {"on_policy": summed[0] / max(summed[1], 1), "rollout_tokens": int(summed[2]),
            "rollout_s": round(slowest, 3), "rollout_age": int(rollout["rollout_age"])}


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, layout: dict[str, Any] | None = None, *,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """accelerate's full state (model, optimizer, scheduler, RNG) written to a temp dir, then renamed;
    ``extra(folder)`` writes each process's own part besides (the on-policy generation buffer)."""
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        # made before the barrier: accelerate's save_state makes it on the main process only, while every process
        # writes its own RNG state into it (a race the 2-process test lost now and then)
        tmp.mkdir()
    wait_for_everyone(accelerator)
    accelerator.save_state(str(tmp), safe_serialization=True)
    if extra is not None:
        extra(tmp)
    wait_for_everyone(accelerator)  # every process has written its part (FSDP2: its shard) before the rename
    if accelerator.is_main_process:
        # written last: marks the checkpoint complete; the layout says which batches the steps held
        atomic_write_json(tmp / "state.json", {"step": step, **(layout or {})})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = [p for p in _checkpoints(run_dir) if p != final]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone(accelerator)
    return final


def _read_log(path: Path, done_steps: int) -> list[dict]:
    """Log rows of the steps the checkpoint holds (a resumed run rewrites the rows after it)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed run
            continue
        if row["step"] <= done_steps:
            rows.append(row)
    return rows


def _append_line(path: Path, row: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def train(
    cfg: DistillConfig | AlignConfig,
    run_dir: Path,
    student: nn.Module,
    tokenizer,
    examples: list[TrainExample],
    teacher_factory: Callable[[Any], Teacher | None],
    *,
    vocab: int | None,
    layer_map: dict[int, int] | None,
    rebuild_student: Callable[[], nn.Module],
    card: dict[str, Any],
    resume: bool = True,
    label: str = "distill",
) -> TrainResult:
    """Run (or resume) the optimisation; returns the log and where the final model was saved.

    The Accelerator comes first (``launch.training_accelerator``: the distribution the launch asked for, checked),
    then the student is prepared, then ``teacher_factory(accelerator)`` builds the teacher on
    ``accelerator.device``. ``rebuild_student`` makes a fresh copy of the student on the CPU, into which the main
    process loads the gathered weights at the end of a sharded run (FSDP2, ZeRO-3) to save them.
    """
    from teacherfit.launch import quiet, training_accelerator

    opts = cfg.train
    if len(examples) < opts.batch_size:
        raise ValueError(f"{len(examples)} training examples is fewer than one micro-batch (batch_size={opts.batch_size})")
    accelerator = training_accelerator(cfg.models, opts, project_dir=run_dir)
    with quiet(not accelerator.is_main_process):  # one console: the main process reports for all
        return _train(cfg, accelerator, run_dir, student, tokenizer, examples, teacher_factory, vocab=vocab,
                      layer_map=layer_map, rebuild_student=rebuild_student, card=card, resume=resume, label=label)


def _train(cfg, accelerator, run_dir: Path, student: nn.Module, tokenizer, examples: list[TrainExample],
           teacher_factory, *, vocab, layer_map, rebuild_student, card, resume: bool, label: str) -> TrainResult:
    from teacherfit.launch import is_sharded

    opts = cfg.train
    torch.manual_seed(opts.seed)
    schedule = Schedule(len(examples), opts, accelerator.num_processes, accelerator.process_index)
    rollouts_on = cfg.kd.on_policy > 0
    if rollouts_on and cfg.rollout.engine == "transformers" and is_sharded(accelerator) \
            and accelerator.num_processes > 1:
        raise ValueError("kd.on_policy with rollout.engine transformers samples from the whole student in each "
                         "process, and FSDP2 / ZeRO-3 split it: launch with DDP (configs/accelerate/ddp.yaml), "
                         "or sample with rollout.engine openai")
    trainer = build_trainer(cfg, accelerator, student, teacher_factory, vocab=vocab, layer_map=layer_map,
                            total_steps=schedule.total_steps)
    on_policy = None
    if rollouts_on:
        from teacherfit.distill.rollouts import OnPolicy, build_engine

        live = accelerator.unwrap_model(trainer.module).student
        engine = build_engine(cfg.rollout, live, tokenizer, accelerator.device, model_path=cfg.student,
                              trust_remote_code=cfg.models.trust_remote_code, max_length=opts.max_length,
                              autocast=accelerator.autocast if accelerator.device.type == "cuda" else None)
        on_policy = OnPolicy(cfg.kd.on_policy, cfg.rollout, engine, examples, step_indices=schedule.step,
                             total_steps=schedule.total_steps, max_length=opts.max_length, seed=opts.seed,
                             rank=accelerator.process_index)

    start = 0
    # what decides which examples each step holds: a resume under another layout would skip or repeat examples
    layout = {"processes": accelerator.num_processes, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
              "examples": len(examples), "seed": opts.seed,
              # which rows are sampled, and which buffer a checkpoint's rollouts belong to
              "on_policy": cfg.kd.on_policy, "buffer_steps": cfg.rollout.buffer_steps if on_policy else None}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        state.setdefault("on_policy", 0.0)  # a checkpoint from before on-policy existed
        state.setdefault("buffer_steps", None)
        changed = {k: (state[k], v) for k, v in layout.items() if k in state and state[k] != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise ValueError(f"{run_dir} holds a run with another batch layout ({what}): resuming would skip or repeat "
                             "examples; launch it as before, or give a new --out")
        accelerator.load_state(str(ckpt))
        if on_policy is not None:
            on_policy.load(ckpt)  # the generation buffer the step was in: its rollouts, not fresh ones
        start = state["step"]
        console.print(f"resuming from {ckpt.name} (step {start} of {schedule.total_steps})")
    log_path = run_dir / LOG_FILE
    log = _read_log(log_path, start)
    if accelerator.is_main_process:
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
    if opts.report_to:
        from teacherfit.config import redact_urls

        # trackers' hyperparameter tables take flat scalars: nested sections dotted, lists as JSON
        flat = flatten(redact_urls(cfg.model_dump(mode="json", by_alias=True)))
        accelerator.init_trackers(f"teacherfit-{label}-{run_dir.name}", config={
            k: "none" if v is None else v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flat.items()})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    clock = time.perf_counter()
    capture = trainer.module_capture()
    if capture is not None:
        capture.__enter__()
    try:
        with progress_bar(label, schedule.total_steps, unit="steps", completed=start) as advance:
            for step in range(start, schedule.total_steps):
                rollout: dict[str, float] = {}
                if on_policy is None:
                    micros = [collate([examples[i] for i in idx], pad_id) for idx in schedule.step(step)]
                else:
                    if capture is not None:  # sampling is not a training forward: no attention maps kept
                        capture.__exit__(None, None, None)
                    try:
                        batches, rollout = on_policy.examples_for(step)
                    finally:
                        if capture is not None:
                            capture.__enter__()
                    micros = [collate(batch, pad_id) for batch in batches]

                def diverged(name: str, k: int, micro: Micro, step: int = step) -> TrainingDiverged:
                    return TrainingDiverged(f"non-finite {name} loss at step {step + 1}, micro-batch {k} "
                                            f"(examples {micro.keys}); last good checkpoint: "
                                            f"{latest_checkpoint(run_dir) or 'none'}")

                unscored = teacher_unscored(trainer.teacher)
                row = {"step": step + 1, **trainer.step(micros, on_diverged=diverged)}
                if on_policy is not None:
                    row.update(rollout_row(accelerator, rollout))
                if unscored is not None:  # a server teacher: tokens it could not score (no advantage there)
                    row["unscored_tokens"] = int(accelerator.reduce(torch.tensor(
                        teacher_unscored(trainer.teacher) - unscored, device=accelerator.device), "sum"))
                row["elapsed_s"] = round(time.perf_counter() - clock, 3)
                if accelerator.is_main_process and (step + 1) % opts.log_every == 0:
                    _append_line(log_path, row)
                if opts.report_to and (step + 1) % opts.log_every == 0:
                    accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "elapsed_s")},
                                    step=step + 1)
                log.append(row)
                advance(1, row["tokens"], info=f"loss {row['loss']:.4f}")
                if (step + 1) % opts.checkpoint_every == 0 or step + 1 == schedule.total_steps:
                    save_checkpoint(accelerator, run_dir, step + 1, opts.keep_checkpoints, layout,
                                    extra=on_policy.save if on_policy is not None else None)
    finally:
        if on_policy is not None:
            on_policy.close()
        if capture is not None:
            capture.__exit__(None, None, None)
        if trainer.teacher is not None:
            trainer.teacher.close()
        if opts.report_to:
            accelerator.end_training()
    result = TrainResult(run_dir, schedule.total_steps, log, resumed_from=start,
                         seconds=time.perf_counter() - clock, distribution=trainer.distribution)
    card = {**card, "steps": schedule.total_steps, "final_log": log[-1] if log else None}
    result.model_dir = save_final_model(accelerator, trainer.module, tokenizer, run_dir / "model",
                                        rebuild=rebuild_student, save_dtype=opts.save_dtype, card=card)
    return result


def saved_dtype(save_dtype: str, accelerator) -> torch.dtype:
    """``train.save_dtype``: 'auto' is the dtype the run computed in (bf16 / fp16 mixed precision on GPUs, fp32 on
    the CPU); the weights were trained in fp32 master copies either way."""
    from teacherfit.models import pick_dtype

    if save_dtype != "auto":
        return pick_dtype(save_dtype, accelerator.device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision), torch.float32)


def save_final_model(accelerator, module, tokenizer, out: Path, *, rebuild: Callable[[], nn.Module],
                     save_dtype: str = "auto", card: dict[str, Any] | None = None) -> Path:
    """The student as users ship it, in ``out`` (Hugging Face format, safetensors, loadable by transformers and
    vLLM): weights in ``save_dtype``, LoRA merged, the tokenizer with the chat template training rendered with
    (the plain one for a base model), and a model card (README.md). A LoRA run also writes the adapter alone
    to ``out``-adapter (peft format).

    Sharded runs (FSDP2, ZeRO-3) gather the full state dict (``accelerator.get_state_dict``, a collective every
    process joins) and the main process loads it into a fresh CPU copy of the student (``rebuild``), so what is
    saved never depends on how the training copy was split.
    """
    from teacherfit.data import chat_template_for
    from teacherfit.launch import is_sharded

    wait_for_everyone(accelerator)
    if is_sharded(accelerator):
        state = accelerator.get_state_dict(module)
        student = None
        if accelerator.is_main_process:
            if accelerator.distributed_type.value == "DEEPSPEED":
                # transformers builds models partitioned (zero.Init, a collective) while a ZeRO-3 config is active;
                # this copy is the main process's alone
                from transformers.integrations import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            student = rebuild()
            prefix = "student."
            missing, unexpected = student.load_state_dict(
                {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
            real_missing = [k for k in missing if not _tied(student, k)]
            if real_missing or unexpected:
                raise RuntimeError(f"gathered weights do not fit the student: missing {real_missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
    else:
        student = accelerator.unwrap_model(module).student
    if accelerator.is_main_process:
        dtype = saved_dtype(save_dtype, accelerator)
        adapter = out.parent / f"{out.name}-adapter"
        lora = hasattr(student, "merge_and_unload")
        if not lora and adapter.exists():
            shutil.rmtree(adapter)  # an earlier LoRA run's, in the same directory
        if lora:  # the adapter alone, then the merged model
            _replace_dir(adapter, lambda tmp: student.save_pretrained(tmp, safe_serialization=True))
            student = student.merge_and_unload()
        student = student.to(dtype)
        template, plain = chat_template_for(tokenizer)
        tokenizer.chat_template = template  # what training rendered with, saved with the tokenizer

        def write(tmp: Path) -> None:
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card({**(card or {}), "dtype": str(dtype).removeprefix("torch."),
                                                       "plain_chat_template": plain,
                                                       "adapter": adapter.name if lora else None}))

        _replace_dir(out, write)
    wait_for_everyone(accelerator)
    return out


def _tied(model: nn.Module, key: str) -> bool:
    """A state-dict key that is the tied copy of another (lm_head.weight of a tied-embedding model)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied if isinstance(tied, (list, tuple, set)) else list(tied)
    return any(key.endswith(n) for n in names)


def _replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def model_card(info: dict[str, Any]) -> str:
    """README.md of a trained student: YAML front matter the Hub reads, then what was trained from what, how."""
    import yaml

    from teacherfit import __version__

    base = info.get("base_model")
    front = {"library_name": "transformers", "tags": ["teacherfit", "distillation", *info.get("tags", [])]}
    if base and "/" in str(base) and not Path(str(base)).exists():
        front["base_model"] = str(base)  # a hub id; local folders stay in the body
    teachers = info.get("teachers") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {info.get('title', 'Distilled student')}", "",
             f"Trained with [teacherfit](https://github.com/teacherfit/teacherfit) {__version__} "
             f"(`{info.get('command', 'teacherfit')}`).", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |"]
    for role, who in teachers.items():
        lines.append(f"| {role} | `{who}` |")
    for key, label in (("data", "training data"), ("examples", "examples"), ("loss", "loss"),
                       ("weights", "loss weights"), ("steps", "optimizer steps"), ("lora", "LoRA"),
                       ("dtype", "saved dtype"), ("adapter", "adapter only")):
        if info.get(key) is not None:
            value = info[key]
            lines.append(f"| {label} | {json.dumps(value) if isinstance(value, (dict, list)) else value} |")
    final = info.get("final_log")
    if final:
        lines.append(f"| last step | loss {final['loss']:.4f}, ce {final['ce']:.4f}, kd {final['kd']:.4f} |")
    if info.get("plain_chat_template"):
        lines += ["", "The base model had no chat template: training rendered conversations with teacherfit's plain "
                  "template, saved with this tokenizer (`tokenizer.apply_chat_template` uses it)."]
    return "\n".join(lines) + "\n"
