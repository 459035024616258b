"""The distillation training runtime: one loop for `distill` and `align`, built on accelerate.

The loop is in view: each optimizer step takes ``grad_accum`` micro-batches, computes the loss
terms as *sums*, divides them by the real token counts of the whole step (across micro-batches and
processes), backpropagates, clips, steps AdamW and the cosine schedule. The data order is a pure function
of (seed, epoch), so a resumed run sees exactly the batches the uninterrupted run would have seen.

Memory: the student's LM head and the KD loss run over chunks of response tokens inside
``DistillModule.forward`` (so FSDP sees one module), attention maps only for mapped layers in query chunks;
the teacher runs frozen in inference mode, or is replaced by the offline top-k cache.

DAE (`align`) uses the same loop with a ``RoutedTeacher``: one teacher per route (the domain expert and
the general reference model, each online or from its cache); each micro-batch's rows go to their route's
teacher, and ``DistillModule`` runs the student once and the head loss once per route on that route's rows.
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
from teacherfit.distill.examples import TrainExample
from teacherfit.distill.losses import chunked_head_losses, linear_head_params
from teacherfit.models import trim_heap
from teacherfit.scoring import PostHead, head_transform, pad_batch, text_config
from teacherfit.store import atomic_write_json, atomic_write_text, flatten
from teacherfit.ui import console, progress_bar

LOG_FILE = "log.jsonl"
CKPT_DIR = "checkpoints"


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or inf; the run stopped and the last good checkpoint is kept."""


class VocabHead(nn.Module):
    """An LM head restricted to the first ``size`` rows: drops padded vocabulary rows no token uses."""

    def __init__(self, head: nn.Module, size: int):
        super().__init__()
        self.head, self.size = head, size

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)[..., : self.size]

    def linear_params(self) -> tuple[Tensor, Tensor | None] | None:
        """The kept rows of a plain linear head (for the fused head loss), else None."""
        params = linear_head_params(self.head)
        if params is None:
            return None
        weight, bias = params
        return weight[: self.size], None if bias is None else bias[: self.size]


def output_head(model: nn.Module, vocab: int | None = None) -> nn.Module:
    head = model.get_output_embeddings()
    return head if vocab is None or head.weight.shape[0] == vocab else VocabHead(head, vocab)


def post_head(model: nn.Module) -> PostHead | None:
    """The model's post-head transform for ``chunked_head_losses`` (checked against its forward), None if identity."""
    post = head_transform(model)
    return None if post.identity else post


def decoder_of(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return base.get_decoder()


def heads_of(model: nn.Module) -> int:
    cfg = text_config(model.config)
    return cfg.num_attention_heads


def layers_of(model: nn.Module) -> int:
    cfg = text_config(model.config)
    return cfg.num_hidden_layers


@dataclass
class Micro:
    """One micro-batch: padded ids, mask, labels, and the example keys (for the cache and error messages)."""

    keys: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    @property
    def query_tokens(self) -> int:
        return int((self.labels != -100).sum())


def collate(examples: list[TrainExample], pad_id: int) -> Micro:
    ids, mask = pad_batch([e.tokens.input_ids for e in examples], pad_id)
    labels, _ = pad_batch([e.tokens.labels for e in examples], -100)
    return Micro([e.key for e in examples], ids, mask, labels)


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
    process (DDP syncs once per step): an epoch's last fewer-than-``world`` micro-batches are left out.
    """

    def __init__(self, n_examples: int, opts: TrainOptions, world: int = 1, rank: int = 0):
        self.n, self.opts, self.world, self.rank = n_examples, opts, world, rank
        self.per_step = opts.grad_accum * world
        micro = math.ceil(n_examples / opts.batch_size)
        short = micro % self.per_step
        if 0 < short < world:  # a process with no micro-batch in a step would leave DDP's gradient sync waiting
            micro -= short
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
    """The student plus the whole loss, so that wrappers (DDP, FSDP, DeepSpeed) see a single forward."""

    def __init__(self, student: nn.Module, kd: KDConfig, *, vocab: int | None, layer_map: dict[int, int] | None,
                 capture: AttentionCapture | None):
        super().__init__()
        self.student = student
        self.kd = kd
        self.vocab = vocab
        self.layer_map = layer_map
        self.capture = capture
        self.post_head = post_head(student)

    def forward(self, input_ids, attention_mask, labels, *, teacher_hidden=None, teacher_head=None,
                teacher_post_head=None, teacher_topk=None, teacher_captured=None,
                teacher_routes=None, divergence_kwargs=None) -> dict[str, Any]:
        if self.capture is not None:
            self.capture.clear()
        hidden = decoder_of(self.student)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if teacher_routes is not None:
            return self._routed_sums(hidden, labels, teacher_routes)
        sums = self._head_sums(hidden, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                               teacher_post_head=teacher_post_head, teacher_topk=teacher_topk,
                               divergence_kwargs=divergence_kwargs)
        if self.capture is not None and teacher_captured is not None:
            attn_sum, attn_count = attention_kd_sums(
                self.capture, teacher_captured, self.layer_map, labels != -100,
                head_map=self.kd.head_map, query_chunk=self.kd.query_chunk,
            )
            sums["attn_sum"], sums["attn_count"] = attn_sum, attn_count
        return sums

    def _routed_sums(self, hidden: Tensor, labels: Tensor, routes: list[dict[str, Any]]) -> dict[str, Any]:
        """DAE: the head loss once per route, on that route's rows, against that route's teacher.

        Routes partition the rows, so the per-route CE sums add up to the batch's CE (each token once) and the
        KD sums to sum over tokens of KL(p* || p_S), p* the routed teacher. ``parts`` keeps each route's KD sum
        for the log; a route with no row in this micro-batch costs nothing and adds 0.
        """
        total: dict[str, Any] = {}
        parts: dict[str, Tensor] = {}
        for route in routes:
            rows = route["rows"].to(hidden.device)
            name = route["name"]
            if rows.numel() == 0:
                parts[f"kd_{name}"] = torch.zeros((), device=hidden.device)
                continue
            signal = {k: v for k, v in route.items() if k not in ("rows", "name")}
            sums = self._head_sums(hidden.index_select(0, rows), labels.index_select(0, rows), **signal)
            parts[f"kd_{name}"] = sums["kd_sum"].detach()
            for key in ("loss_sum", "kd_sum", "ce_sum", "n_tokens"):
                total[key] = total[key] + sums[key] if key in total else sums[key]
        if not total:
            raise ValueError("no routed rows in a micro-batch: every row needs a route")
        total["parts"] = parts
        return total

    def _head_sums(self, hidden: Tensor, labels: Tensor, *, teacher_hidden=None, teacher_head=None,
                   teacher_post_head=None, teacher_topk=None, divergence_kwargs=None) -> dict[str, Any]:
        return chunked_head_losses(
            hidden[:, :-1],
            output_head(self.student, self.vocab),
            labels[:, 1:],
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[:, :-1],
            teacher_head=teacher_head,
            teacher_topk=teacher_topk,
            divergence=self.kd.divergence,
            divergence_kwargs={**self.kd.divergence_kwargs, **(divergence_kwargs or {})} or None,
            temperature=self.kd.temperature,
            chunk_size=self.kd.chunk_for(self.student.get_output_embeddings().weight.shape[0]),
            post_head=self.post_head,
            teacher_post_head=teacher_post_head,
            kd_weight=self.kd.lambda_ * self.kd.w_pred,
            ce_weight=1 - self.kd.lambda_,
            fused=self.kd.fused_head,
        )


class OnlineTeacher:
    """The frozen teacher run beside the student (same or another device), in inference mode."""

    def __init__(self, model: nn.Module, *, vocab: int | None, attn_layers: list[int] | None,
                 device: torch.device, student_device: torch.device):
        import copy

        self.model = model.eval().requires_grad_(False)
        head = output_head(model, vocab)
        # the KD chunks run where the student's hidden states are: a copy of the head only if devices differ
        self.head = head if device == student_device else copy.deepcopy(head).to(student_device)
        self.post_head = post_head(model)  # before the capture hooks: the check runs a forward
        self.device, self.student_device = device, student_device
        self.capture = AttentionCapture(model, attn_layers) if attn_layers else None
        if self.capture is not None:
            self.capture.__enter__()

    def __call__(self, micro: Micro) -> dict[str, Any]:
        if self.capture is not None:
            self.capture.clear()
        with torch.no_grad():
            hidden = decoder_of(self.model)(input_ids=micro.input_ids.to(self.device),
                                            attention_mask=micro.attention_mask.to(self.device)).last_hidden_state
        signal: dict[str, Any] = {"teacher_hidden": hidden.to(self.student_device), "teacher_head": self.head,
                                  "teacher_post_head": self.post_head}
        if self.capture is not None:
            signal["teacher_captured"] = {
                k: v._replace(query=v.query.to(self.student_device), key=v.key.to(self.student_device))
                for k, v in self.capture.captured.items()}
        return signal

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)


class AdaptersOff:
    """A LoRA model's output head called with every adapter switched off (the head's own adapter included).

    The KD chunks call the teacher head after the teacher's forward has returned, so a head that carries an
    adapter (``target_modules`` with ``lm_head``) must switch the adapters off itself at each call."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, hidden: Tensor) -> Tensor:
        with self.model.disable_adapter():
            return self.head(hidden)


class StartingWeightsTeacher:
    """The student's own starting weights as a frozen teacher, at no memory cost: a LoRA student with its
    adapters switched off (``peft``'s ``disable_adapter``) is exactly the model it started from.

    For DAE's general reference this keeps, on non-domain samples, what the student already did. The adapters
    are off for the whole teacher: the decoder here and the output head in the KD chunks (``AdaptersOff``).
    """

    def __init__(self, model: nn.Module, *, vocab: int | None, student_device: torch.device):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("the starting-weights teacher needs a LoRA student (set `lora`), or give the model itself")
        self.model, self.vocab, self.student_device = model, vocab, student_device
        self.head = AdaptersOff(model, output_head(model, vocab))
        self.post_head = post_head(model)

    def __call__(self, micro: Micro) -> dict[str, Any]:
        with torch.no_grad(), self.model.disable_adapter():
            hidden = decoder_of(self.model)(input_ids=micro.input_ids.to(self.student_device),
                                            attention_mask=micro.attention_mask.to(self.student_device)).last_hidden_state
        return {"teacher_hidden": hidden.detach(), "teacher_head": self.head, "teacher_post_head": self.post_head}

    def close(self) -> None:
        pass


class CachedTeacher:
    """The teacher's top-k distributions read from an offline cache (no teacher in memory)."""

    def __init__(self, cache, student_device: torch.device, loss_kwargs: dict | None = None):
        # loss_kwargs: how this cache's rows are read (``TopKCache.loss_kwargs()``), sent with each batch when
        # teachers of one run differ in it (align); distill sets it once in kd.divergence_kwargs instead
        self.cache, self.student_device, self.loss_kwargs = cache, student_device, loss_kwargs

    def __call__(self, micro: Micro) -> dict[str, Any]:
        ids, logprobs = self.cache.collate(micro.keys, micro.labels[:, 1:])
        signal: dict[str, Any] = {"teacher_topk": (ids.to(self.student_device), logprobs.to(self.student_device))}
        if self.loss_kwargs is not None:
            signal["divergence_kwargs"] = self.loss_kwargs
        return signal

    def close(self) -> None:
        pass


class RoutedTeacher:
    """DAE's teachers: one per route (e.g. the domain expert and the general reference model), each an
    ``OnlineTeacher`` or a ``CachedTeacher``, and the route of every training example (by key).

    Per micro-batch, each teacher runs on its own rows only (a sub-batch of the same padded width, so
    positions line up with the student's), and the signals come back as ``{"teacher_routes": [{"name",
    "rows", **signal}, ...]}`` for ``DistillModule``. Teachers are built by their factories on first use,
    in route order; a cached teacher holds no model, so with both routes cached no teacher is in memory.
    """

    def __init__(self, factories: dict[str, Callable[[], OnlineTeacher | CachedTeacher]], route_of: dict[str, str]):
        unknown = set(route_of.values()) - set(factories)
        if unknown:
            raise ValueError(f"examples routed to {sorted(unknown)}, which have no teacher")
        self.factories, self.route_of = factories, route_of
        self.teachers: dict[str, OnlineTeacher | CachedTeacher] = {}

    def teacher(self, name: str) -> OnlineTeacher | CachedTeacher:
        if name not in self.teachers:
            self.teachers[name] = self.factories[name]()
        return self.teachers[name]

    def __call__(self, micro: Micro) -> dict[str, Any]:
        routes = []
        for name in self.factories:
            rows = [i for i, key in enumerate(micro.keys) if self.route_of[key] == name]
            index = torch.tensor(rows, dtype=torch.long)
            entry: dict[str, Any] = {"name": name, "rows": index}
            if rows:
                sub = Micro([micro.keys[i] for i in rows], micro.input_ids.index_select(0, index),
                            micro.attention_mask.index_select(0, index), micro.labels.index_select(0, index))
                entry.update(self.teacher(name)(sub))
            routes.append(entry)
        return {"teacher_routes": routes}

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()


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

    def summary(self) -> dict[str, Any]:
        """The run's part of a command's summary.json: where, how long, and the first and last log rows."""
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "steps": self.steps,
                "resumed_from": self.resumed_from, "seconds": round(self.seconds, 2),
                "first": self.log[0] if self.log else None, "final": self.log[-1] if self.log else None}


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CKPT_DIR
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in _checkpoints(run_dir) if (p / "state.json").exists()]
    return done[-1] if done else None


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """accelerate's full state (model, optimizer, scheduler, RNG) written to a temp dir, then renamed."""
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
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        atomic_write_json(tmp / "state.json", {"step": step})  # written last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = [p for p in _checkpoints(run_dir) if p != final]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
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
    teacher_factory: Callable[[torch.device], OnlineTeacher | CachedTeacher | RoutedTeacher | None],
    *,
    vocab: int | None,
    layer_map: dict[int, int] | None,
    resume: bool = True,
    label: str = "distill",
) -> TrainResult:
    """Run (or resume) the optimisation; returns the log and where the final model was saved."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    opts, kd = cfg.train, cfg.kd
    cpu = cfg.models.device == "cpu" or not torch.cuda.is_available()
    mixed = "no" if cpu or cfg.models.dtype in ("float32", "fp32") else (
        "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    # experiment trackers through accelerate (tensorboard, trackio, wandb...): logs go to the run directory where
    # the tracker writes locally; only the main process logs
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, log_with=list(opts.report_to) or None,
                              project_dir=str(run_dir))
    torch.manual_seed(opts.seed)
    schedule = Schedule(len(examples), opts, accelerator.num_processes, accelerator.process_index)
    if len(examples) < opts.batch_size:
        raise ValueError(f"{len(examples)} training examples is fewer than one micro-batch (batch_size={opts.batch_size})")

    attn_on = bool(kd.w_attn > 0 and kd.lambda_ > 0 and layer_map)
    if opts.gradient_checkpointing:
        if attn_on:
            raise ValueError("train.gradient_checkpointing cannot be combined with attention KD (the captured maps "
                             "would be recorded again during recomputation): set kd.w_attn=0 or turn it off")
        enable_gradient_checkpointing(student)
    capture = AttentionCapture(student, list(layer_map)) if attn_on else None
    module = DistillModule(student, kd, vocab=vocab, layer_map=layer_map if attn_on else None, capture=capture)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = make_optimizer([{"params": decay, "weight_decay": opts.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(opts.warmup_steps, schedule.total_steps),
                                                schedule.total_steps)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    teacher = teacher_factory(accelerator.device)
    needs_teacher = kd.lambda_ > 0 and (kd.w_pred > 0 or attn_on)
    if needs_teacher and teacher is None:
        raise ValueError("KD terms are on (kd.lambda > 0) but no teacher or teacher_cache was given")

    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start = json.loads((ckpt / "state.json").read_text())["step"]
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
    world = accelerator.num_processes
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    clock = time.perf_counter()
    if capture is not None:
        capture.__enter__()
    try:
        with progress_bar(label, schedule.total_steps, unit="steps", completed=start) as advance:
            for step in range(start, schedule.total_steps):
                micros = [collate([examples[i] for i in idx], pad_id) for idx in schedule.step(step)]
                counts = torch.tensor([sum(m.loss_tokens for m in micros),
                                       sum(m.query_tokens for m in micros)], dtype=torch.float64,
                                      device=accelerator.device)
                tokens_global, queries_global = accelerator.reduce(counts, "sum").tolist()
                totals = {"ce": 0.0, "kd": 0.0, "attn": 0.0}
                parts: dict[str, float] = {}  # per-route KD (align), same normalisation as kd
                for k, micro in enumerate(micros):
                    signal = teacher(micro) if (teacher is not None and needs_teacher) else {}
                    sync = accelerator.no_sync(module) if k < len(micros) - 1 else contextlib.nullcontext()
                    with sync:
                        sums = module(micro.input_ids.to(accelerator.device),
                                      micro.attention_mask.to(accelerator.device),
                                      micro.labels.to(accelerator.device), **signal)
                        # loss_sum = (1 - lambda) * ce_sum + lambda * w_pred * kd_sum, differentiable
                        head_loss = sums["loss_sum"] / tokens_global
                        terms = {"ce": sums["ce_sum"] / tokens_global, "kd": sums["kd_sum"] / tokens_global}
                        if attn_on and "attn_sum" in sums:
                            # mean over (layer, head, response query) of the whole step: this micro-batch's
                            # mean, weighted by its share of the step's response queries
                            share = micro.query_tokens / queries_global
                            terms["attn"] = sums["attn_sum"] / max(sums["attn_count"], 1) * share
                        for name, value in terms.items():
                            if not torch.isfinite(value):
                                last = latest_checkpoint(run_dir)
                                raise TrainingDiverged(
                                    f"non-finite {name} loss at step {step + 1}, micro-batch {k} "
                                    f"(examples {micro.keys}); last good checkpoint: {last or 'none'}")
                        loss = head_loss
                        if "attn" in terms:
                            loss = loss + kd.lambda_ * kd.w_attn * terms["attn"]
                        # DDP averages gradients over processes; the terms are already global means
                        accelerator.backward(loss * world)
                    for name, value in terms.items():
                        totals[name] += float(value.detach())
                    for name, value in sums.get("parts", {}).items():
                        parts[name] = parts.get(name, 0.0) + float(value) / tokens_global
                # each process holds its share of the step's global means: add them up for the log
                names = ["ce", "kd", "attn"] + sorted(parts)  # every process has the same route names
                summed = accelerator.reduce(torch.tensor([totals.get(n, parts.get(n)) for n in names],
                                                         dtype=torch.float64, device=accelerator.device), "sum")
                totals = dict(zip(names, summed.tolist()))
                grad_norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.device.type == "cpu":
                    trim_heap()
                total = (1 - kd.lambda_) * totals["ce"] + kd.lambda_ * (kd.w_pred * totals["kd"] + kd.w_attn * totals["attn"])
                row = {"step": step + 1, "loss": total, "ce": totals["ce"], "kd": totals["kd"], "attn": totals["attn"],
                       "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens": int(tokens_global),
                       "elapsed_s": round(time.perf_counter() - clock, 3)}
                row.update({n: totals[n] for n in sorted(parts)})
                if accelerator.is_main_process and (step + 1) % opts.log_every == 0:
                    _append_line(log_path, row)
                if opts.report_to and (step + 1) % opts.log_every == 0:
                    accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "elapsed_s")},
                                    step=step + 1)
                log.append(row)
                advance(1, int(tokens_global), info=f"loss {total:.4f}")
                if (step + 1) % opts.checkpoint_every == 0 or step + 1 == schedule.total_steps:
                    save_checkpoint(accelerator, run_dir, step + 1, opts.keep_checkpoints)
    finally:
        if capture is not None:
            capture.__exit__(None, None, None)
        if teacher is not None:
            teacher.close()
        if opts.report_to:
            accelerator.end_training()
    result = TrainResult(run_dir, schedule.total_steps, log, resumed_from=start,
                         seconds=time.perf_counter() - clock)
    result.model_dir = save_final_model(accelerator, module, tokenizer, run_dir / "model")
    return result


def save_final_model(accelerator, module, tokenizer, out: Path) -> Path:
    """The student in Hugging Face format (safetensors; LoRA merged), loadable by transformers and vLLM."""
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(module).student
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if accelerator.is_main_process:
        tmp = out.parent / f".tmp-{out.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out
