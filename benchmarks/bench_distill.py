"""Logit distillation: teacherfit's KD step against TRL's GKD trainer and against naive full-logit KD.

Teacher: a packaged model (default SmolLM2-135M-Instruct, vocab 49152); student: a half-depth copy of it
(``shrink_layers`` with ``every_other``: 15 of 30 layers, same tokenizer). fp32 on CPU, no bf16, no gradient
checkpointing anywhere. Data: the quickstart's SmolLM2 responses tokenized with the chat template by
``tokenize_records`` (response-only labels).

1. **teacherfit vs TRL GKD**, off-policy (``lmbda=0``), forward KL (``beta=0``), temperature 1, no generation:
   ``--warmup`` + ``--steps`` optimizer steps with each on identical batches (``--batch`` x ``--seq-len``,
   truncated and right-padded to that length). teacherfit's side is ``Trainer.step``, the product's own training
   step (what ``distill.train.train`` calls each step), one micro-batch per step: the Accelerator from
   ``launch.training_accelerator`` (one process, CPU, fp32) and the trainer from ``build_trainer`` (the
   ``OnlineTeacher`` + ``DistillModule`` with kd.lambda=1, kd.w_attn=0, grad_accum 1, AdamW with weight decay
   0, clip 1.0, warm-up 0 and a cosine schedule over 10^6 steps, i.e. a constant learning rate like TRL's);
   TRL runs ``GKDTrainer.train()`` with bf16 and gradient checkpointing off.
   Speed: both run in ONE process, alternating step by step on the same batch (each teacherfit variant on
   its own copy of the student), so other jobs on a shared machine slow both alike; tokens/s counts real
   (non-pad) tokens, and the verdict is the median over steps of TRL's step time / teacherfit's. Memory:
   each trainer alone in a fresh process. Targets: >= 1.3x TRL tokens/s, <= 0.6x TRL peak-memory increment.
2. **teacherfit vs naive full-logit KD**: the memory of one forward + backward of the KD loss. Naive =
   ``student(...).logits`` and ``teacher(...).logits`` (full [B, T, V] fp32) + ``losses.forward_kl``;
   teacherfit = ``DistillModule`` with the ``OnlineTeacher``'s signal (``chunked_head_losses``), no optimizer. Over sequence lengths at the real vocabulary
   (examples packed end to end to fill each row), and over vocabulary sizes with a synthetic random LM head
   on the student's hidden size (random hidden states; every position a loss position).
3. **Utilisation**: useful FLOP/s of the measured teacherfit step (counted analytically, see ``step_flops``)
   against this machine's fp32 matmul peak, measured here (2048 x 2048 ``torch.matmul``).

Every measurement with a memory figure runs in its own subprocess (the script re-invokes itself with
``--only``); peak memory is the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after
the models are loaded) and the increment is that peak minus the RSS right after loading.

    python benchmarks/bench_distill.py                          # everything, ~10 minutes on 2 cores
    python benchmarks/bench_distill.py --parts 1 3 --steps 3    # only the TRL comparison and utilisation
    python benchmarks/bench_distill.py --kd-seq-lens 256 512 1024 2048 --vocabs 49152 262144
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import load_line, machine_line, markdown_table, print_table

RESULT_PREFIX = "RESULT "
DEFAULT_TEACHER = "smollm2-135m-instruct"
SPEED_TARGET, MEMORY_TARGET = 1.3, 0.6
# the schedule's length given to build_trainer: warm-up 0 and a cosine over 10^6 steps keep the learning rate
# at --lr (to within 1e-9) for a benchmark's few steps, as TRL's constant schedule does
SCHEDULE_STEPS = 1_000_000


def default_data() -> Path:
    from teacherfit.pipelines.quickstart import ASSETS

    return ASSETS / "responses" / "smollm2-135m-instruct.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="which comparisons to run (default: all)")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model (default: %(default)s)")
    ap.add_argument("--student-layers", default="every_other",
                    help="student = these layers of the teacher (StudentInit.layers; default: %(default)s)")
    ap.add_argument("--data", type=Path, default=None, help="response set JSONL (default: quickstart SmolLM2 responses)")
    ap.add_argument("--batch", type=int, default=4, help="part 1 batch size (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256, help="part 1 tokens per row (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=6, help="part 1 measured optimizer steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="part 1 unmeasured first steps (default: %(default)s)")
    ap.add_argument("--mem-steps", type=int, default=None,
                    help="part 1 memory runs: steps after the warm-up (default: --steps; the peak RSS grows over "
                         "the first steps as the allocator's heap fragments)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate, both trainers (default: %(default)s)")
    ap.add_argument("--head-chunk", type=int, default=None,
                    help="teacherfit kd.head_chunk (default: KDConfig's default)")
    ap.add_argument("--extra-head-chunks", type=int, nargs="*", default=[],
                    help="part 1: also run teacherfit with these kd.head_chunk values (default: none)")
    ap.add_argument("--no-memory", action="store_true",
                    help="part 1: the speed run only (skip the two peak-memory runs)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="teacherfit's students use train.gradient_checkpointing (TRL's stays off, as specified)")
    ap.add_argument("--compare-checkpointed", action="store_true",
                    help="part 1: also run teacherfit's checkpointed head path (kd.fused_head=false) side by side")
    ap.add_argument("--kd-batch", type=int, default=2, help="part 2 batch size, real models (default: %(default)s)")
    ap.add_argument("--kd-seq-lens", type=int, nargs="+", default=[256, 512, 1024],
                    help="part 2 sequence lengths at the real vocabulary (default: %(default)s)")
    ap.add_argument("--head-batch", type=int, default=1, help="part 2 synthetic head: batch (default: %(default)s)")
    ap.add_argument("--head-seq-len", type=int, default=2048,
                    help="part 2 synthetic head: tokens per row (default: %(default)s)")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[49152, 131072, 262144],
                    help="part 2 synthetic head vocabulary sizes (default: %(default)s)")
    ap.add_argument("--peak-size", type=int, default=2048, help="matmul size for the fp32 peak (default: %(default)s)")
    ap.add_argument("--memory-margin", type=float, default=3.0,
                    help="part 2: skip a cell whose extrapolated peak would leave less than this many GiB of "
                         "MemAvailable (default: %(default)s)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess (default: %(default)s)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown as well")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    # internal: one measurement in a fresh process
    ap.add_argument("--only", default=None,
                    choices=["speed", "trl", "teacherfit", "kd-naive", "kd-teacherfit", "head-naive", "head-teacherfit"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--cell", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_steps is None:
        args.mem_steps = args.steps
    return args


# ---------------------------------------------------------------- peak memory (child processes)


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


class PeakRSS:
    """Peak resident memory of this process from a reset point: VmHWM after clear_refs, else sampling."""

    def __init__(self):
        self.load_peak = _status_mib("VmHWM")
        self._stop = threading.Event()
        self._sampled = 0.0
        self.exact = True

    def __enter__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.exact = False
        self.base = _status_mib("VmRSS")
        self._sampled = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_mib("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = _status_mib("VmHWM") if self.exact else self._sampled
        self.peak = max(self.peak, self._sampled)

    def result(self) -> dict:
        return {"load_peak_mib": round(self.load_peak), "base_mib": round(self.base), "peak_mib": round(self.peak),
                "increment_mib": round(self.peak - self.base), "peak_exact": self.exact}


# ---------------------------------------------------------------- models and data (child processes)


def load_teacher(args):
    """(teacher, tokenizer): the frozen teacher, fp32 on CPU, its weights resident."""
    from teacherfit.models import load_model

    teacher = load_model(args.teacher, device="cpu", dtype="float32")
    teacher.model.config.use_cache = False
    resident(teacher.model)
    return teacher.model, teacher.tokenizer


def load_student(args):
    """A trainable half-depth copy of the teacher, fp32 on CPU, made by the product's ``build_student``
    (``shrink_layers`` to ``--student-layers``, train mode, no KV cache)."""
    from teacherfit.pipelines.recipe import build_student

    student, _tok, _prov = build_student(bench_config(args))
    resident(student)
    return student


def bench_config(args, head_chunk: int | None = None, fused: bool = True):
    """The DistillConfig teacherfit's side runs with: the teacher's own half-depth student, pure KD (kd.lambda 1,
    no attention term), forward KL at tau 1, one micro-batch of --batch rows per step, fp32 on the CPU."""
    from teacherfit.config import (
        DistillConfig,
        KDConfig,
        ModelOptions,
        StudentInit,
        TrainData,
        TrainOptions,
    )

    kd = KDConfig(**{"lambda": 1.0, "w_attn": 0.0, "w_pred": 1.0, "divergence": "forward_kl", "temperature": 1.0,
                     "head_chunk": head_chunk or args.head_chunk, "fused_head": fused})
    train = TrainOptions(lr=args.lr, batch_size=args.batch, grad_accum=1, warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, max_length=max(16, args.seq_len),
                         gradient_checkpointing=args.gradient_checkpointing)
    return DistillConfig(student=args.teacher, teacher=args.teacher, student_init=StudentInit(layers=args.student_layers),
                         data=TrainData(), kd=kd, train=train, models=ModelOptions(device="cpu", dtype="float32"))


_ACCELERATOR = None


def bench_accelerator(cfg):
    """The process's one Accelerator (``launch.training_accelerator``), shared by every trainer built here:
    accelerate's state is process-wide, and every variant asks for the same one (one process, CPU, no mixed
    precision, grad_accum 1)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from teacherfit.launch import training_accelerator

        _ACCELERATOR = training_accelerator(cfg.models, cfg.train)
    return _ACCELERATOR


def load_pair(args):
    """(teacher, student, tokenizer)."""
    teacher, tok = load_teacher(args)
    return teacher, load_student(args), tok


def resident(model) -> None:
    """Copy every weight out of the (lazily paged-in, memory-mapped) checkpoint into ordinary memory.

    Otherwise the first forward pass and the first optimizer step (copy-on-write) would page weights in
    after the baseline RSS was read, and count the model itself as training memory.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()


def read_examples(args, tokenizer, max_length: int):
    from teacherfit.config import ResponseSetConfig, TrainData
    from teacherfit.distill.examples import tokenize_records, training_records

    data = TrainData(responses=[ResponseSetConfig(name="bench", path=args.data or default_data())])
    examples, stats = tokenize_records(training_records(data), tokenizer, max_length)
    if not examples:
        raise SystemExit(f"no example keeps a response token at max length {max_length}: {stats}")
    return examples


def fixed_batches(args, tokenizer, n_batches: int):
    """Part 1: examples in file order (cycled), truncated and right-padded to exactly --seq-len."""
    from teacherfit.distill.examples import Micro

    examples = read_examples(args, tokenizer, args.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for b in range(n_batches):
        rows = [examples[(b * args.batch + j) % len(examples)] for j in range(args.batch)]
        ids = torch.full((args.batch, args.seq_len), pad, dtype=torch.long)
        mask = torch.zeros((args.batch, args.seq_len), dtype=torch.long)
        labels = torch.full((args.batch, args.seq_len), -100, dtype=torch.long)
        for r, ex in enumerate(rows):
            n = len(ex.tokens.input_ids)
            ids[r, :n] = torch.tensor(ex.tokens.input_ids)
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(ex.tokens.labels)
        batches.append(Micro([ex.key for ex in rows], ids, mask, labels))
    return batches


def packed_batch(args, tokenizer, batch: int, seq_len: int):
    """Part 2: whole examples packed end to end (prompt labels -100) to fill batch x seq_len, no padding."""
    from teacherfit.distill.examples import Micro

    examples = read_examples(args, tokenizer, 100_000)
    ids, labels, k = [], [], 0
    while len(ids) < batch * seq_len:
        ex = examples[k % len(examples)]
        ids += list(ex.tokens.input_ids)
        labels += list(ex.tokens.labels)
        k += 1
    ids = torch.tensor(ids[: batch * seq_len]).view(batch, seq_len)
    labels = torch.tensor(labels[: batch * seq_len]).view(batch, seq_len)
    return Micro([str(i) for i in range(batch)], ids, torch.ones_like(ids), labels)


def kd_module(args, student, head_chunk: int | None = None, fused: bool = True):
    """Part 2: the student wrapped with its loss (``DistillModule``), as build_trainer wraps it."""
    from teacherfit.distill.train import DistillModule

    kd = bench_config(args, head_chunk, fused).kd
    return DistillModule(student, kd, vocab=None, layer_map=None, capture=None), kd


def teacherfit_loss(module, teacher, micro):
    """Part 2: the loss of one micro-batch as Trainer.step builds it (sums / the step's loss tokens)."""
    n = micro.loss_tokens
    sums = module(micro.input_ids, micro.attention_mask, micro.labels, teacher(micro))  # a TeacherSignal
    # loss_sum = (1 - lambda) * ce_sum + lambda * w_pred * kd_sum
    return sums["loss_sum"] / n, sums["kd_sum"] / n


def model_shapes(teacher, student) -> dict:
    from teacherfit.models import decoder_of

    def nonembedding(model) -> int:
        dec = decoder_of(model)
        return sum(p.numel() for p in dec.layers.parameters()) + sum(p.numel() for p in dec.norm.parameters())

    cfg = teacher.config
    return {"teacher_nonemb": nonembedding(teacher), "student_nonemb": nonembedding(student),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_layers": len(decoder_of(teacher).layers), "student_layers": len(decoder_of(student).layers),
            "hidden": cfg.hidden_size, "vocab": student.get_output_embeddings().weight.shape[0],
            "attn_width": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)}


def batch_counts(micros) -> dict:
    return {"real_tokens": [int(m.attention_mask.sum()) for m in micros],
            "loss_tokens": [m.loss_tokens for m in micros],
            "positions": [m.input_ids.numel() for m in micros]}


# ---------------------------------------------------------------- children


class TeacherfitStepper:
    """teacherfit's side: the product's own training step, ``Trainer.step``, one micro-batch per step.

    The trainer comes from ``build_trainer`` (DistillModule + AdamW + schedule, prepared by the process's
    Accelerator; gradient checkpointing when --gradient-checkpointing) with the teacher as an ``OnlineTeacher``
    on the CPU; the timed call is ``trainer.step([micro])``: teacher forward, student forward + fused KD head,
    backward, clip 1.0, AdamW and schedule step.
    """

    def __init__(self, args, teacher_model, student, head_chunk: int | None = None, fused: bool = True):
        from teacherfit.distill.teachers import OnlineTeacher
        from teacherfit.distill.train import build_trainer

        cpu = torch.device("cpu")
        cfg = bench_config(args, head_chunk, fused)
        self.kd = cfg.kd
        self.chunk = self.kd.chunk_for(student.get_output_embeddings().weight.shape[0])
        self.gradient_checkpointing = cfg.train.gradient_checkpointing

        def teacher_factory(_accelerator):
            return OnlineTeacher(teacher_model, vocab=None, attn_layers=None, device=cpu, student_device=cpu)

        self.trainer = build_trainer(cfg, bench_accelerator(cfg), student, teacher_factory, vocab=None,
                                     layer_map=None, total_steps=SCHEDULE_STEPS)
        self.step_s, self.kd_loss = [], []

    def step(self, micro) -> None:
        start = time.perf_counter()
        row = self.trainer.step([micro])
        self.step_s.append(time.perf_counter() - start)
        self.kd_loss.append(row["kd"])

    def result(self) -> dict:
        opt = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate's wrapper
        return {"step_s": self.step_s, "kd_loss": self.kd_loss, "head_chunk": self.chunk, "fused": self.kd.fused_head,
                "gradient_checkpointing": self.gradient_checkpointing, "step": "teacherfit.distill.train.Trainer.step",
                "optimizer": f"torch.optim.AdamW (fused={opt.defaults.get('fused')}, weight_decay 0)"}


def run_trl(args, teacher_model, student, tok, micros, between=None) -> dict:
    """TRL's GKDTrainer.train() on ``micros`` in order; ``between(i)`` runs after step i (not timed as TRL's)."""
    import datasets
    import trl
    from transformers import TrainerCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # older TRL
        from trl import GKDConfig, GKDTrainer

    datasets.disable_progress_bars()
    rows = [{k: getattr(m, k)[r].tolist() for k in ("input_ids", "attention_mask", "labels")}
            for m in micros for r in range(m.input_ids.shape[0])]
    dataset = datasets.Dataset.from_list(rows)

    def collator(features):
        return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.losses = 0.0, [], []

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, _args, state, *a, **k):
            self.step_s.append(time.perf_counter() - self.begin)
            if between is not None:
                between(state.global_step - 1)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        config = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=micros[0].input_ids.shape[0], max_steps=len(micros),
            lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=micros[0].input_ids.shape[1],
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=config, train_dataset=dataset,
                             data_collator=collator, processing_class=tok, callbacks=[clock])
        trainer.train()
    return {"step_s": clock.step_s, "kd_loss": clock.losses, "trl_version": trl.__version__,
            "optimizer": str(config.optim), "trainer": f"{GKDTrainer.__module__}.GKDTrainer"}


def child_speed(args) -> dict:
    """TRL and teacherfit in one process, alternating step by step on the same batches.

    Each step of TRL's trainer is followed by the same batch's step of each teacherfit variant (its own copy of
    the student and its own optimizer, the teacher shared): both see the same load from other processes.
    """
    teacher_model, tok = load_teacher(args)
    micros = fixed_batches(args, tok, args.warmup + args.steps)
    variants = [(c, True) for c in [args.head_chunk, *args.extra_head_chunks]]
    if args.compare_checkpointed:
        variants.append((args.head_chunk, False))
    steppers = [TeacherfitStepper(args, teacher_model, load_student(args), c, f) for c, f in variants]

    matmul: list[float] = []

    def between(i: int) -> None:
        for stepper in steppers:
            stepper.step(micros[i])
        matmul.append(matmul_peak(args.peak_size, reps=3, rounds=1))  # the machine's rate right now

    trl_student = load_student(args)
    shapes = model_shapes(teacher_model, trl_student)
    trl_result = run_trl(args, teacher_model, trl_student, tok, micros, between)
    return {"trl": trl_result, "teacherfit": [st.result() for st in steppers], "shapes": shapes,
            "matmul_gflops": matmul, **batch_counts(micros)}


def child_teacherfit(args) -> dict:
    teacher_model, tok = load_teacher(args)
    student = load_student(args)
    micros = fixed_batches(args, tok, args.warmup + args.mem_steps)
    bench_accelerator(bench_config(args))  # before the baseline, as TRL's child imports trl before it
    with PeakRSS() as mem:
        stepper = TeacherfitStepper(args, teacher_model, student, args.head_chunk)
        for micro in micros:
            stepper.step(micro)
    return {**stepper.result(), **mem.result()}


def child_trl(args) -> dict:
    import datasets  # noqa: F401  (imported before the baseline, like everything the run needs)
    import trl  # noqa: F401

    teacher_model, tok = load_teacher(args)
    student = load_student(args)
    micros = fixed_batches(args, tok, args.warmup + args.mem_steps)
    with PeakRSS() as mem:
        result = run_trl(args, teacher_model, student, tok, micros)
    return {**result, **mem.result()}


def child_kd(args, naive: bool) -> dict:
    from teacherfit.distill.losses import forward_kl
    from teacherfit.distill.teachers import OnlineTeacher

    cell = json.loads(args.cell)
    teacher_model, student, tok = load_pair(args)
    micro = packed_batch(args, tok, args.kd_batch, cell["seq"])
    cpu = torch.device("cpu")
    start = time.perf_counter()
    with PeakRSS() as mem:
        if naive:
            s_logits = student(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
            with torch.no_grad():
                t_logits = teacher_model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
            loss = forward_kl(s_logits[:, :-1], t_logits[:, :-1], micro.labels[:, 1:])
            kl = loss
        else:
            module, _kd = kd_module(args, student)
            teacher = OnlineTeacher(teacher_model, vocab=None, attn_layers=None, device=cpu, student_device=cpu)
            loss, kl = teacherfit_loss(module, teacher, micro)
        loss.backward()
    return {"seconds": time.perf_counter() - start, "kd_loss": float(kl.detach()), **mem.result(),
            "tokens": micro.input_ids.numel(), "loss_tokens": micro.loss_tokens,
            "vocab": student.get_output_embeddings().weight.shape[0]}


def child_head(args, naive: bool) -> dict:
    from teacherfit.config import KDConfig
    from teacherfit.distill.losses import chunked_head_losses, forward_kl

    cell = json.loads(args.cell)
    vocab, d = cell["vocab"], cell["hidden"]
    b, t = args.head_batch, args.head_seq_len
    torch.manual_seed(0)
    student_head = torch.nn.Linear(d, vocab, bias=False)
    teacher_head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(b, t, d, requires_grad=True)
    teacher_hidden = torch.randn(b, t, d)
    labels = torch.randint(0, vocab, (b, t))
    chunk = KDConfig(head_chunk=args.head_chunk).chunk_for(vocab)
    start = time.perf_counter()
    with PeakRSS() as mem:
        if naive:
            s_logits = student_head(hidden)
            with torch.no_grad():
                t_logits = teacher_head(teacher_hidden)
            loss = forward_kl(s_logits, t_logits, labels)
        else:
            # as DistillModule calls it at kd.lambda = 1 (CE logged, without gradient); loss = loss_sum / n
            sums = chunked_head_losses(hidden, student_head, labels, teacher_hidden=teacher_hidden,
                                       teacher_head=teacher_head, chunk_size=chunk, kd_weight=1.0, ce_weight=0.0)
            loss = sums["loss_sum"] / sums["n_tokens"]
        loss.backward()
    return {"seconds": time.perf_counter() - start, "kd_loss": float(loss.detach()), **mem.result(),
            "tokens": b * t, "head_chunk": chunk}


def run_child(args) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    fn = {"speed": child_speed, "teacherfit": child_teacherfit, "trl": child_trl,
          "kd-naive": lambda a: child_kd(a, True), "kd-teacherfit": lambda a: child_kd(a, False),
          "head-naive": lambda a: child_head(a, True), "head-teacherfit": lambda a: child_head(a, False)}[args.only]
    result = fn(args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def spawn(args, only: str, cell: dict | None = None, head_chunk: int | None = None) -> dict:
    """Run one measurement in a fresh process; {"error": ...} if it failed."""
    head_chunk = head_chunk or args.head_chunk
    forward = ["--teacher", args.teacher, "--student-layers", args.student_layers, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lr", str(args.lr), "--kd-batch", str(args.kd_batch), "--head-batch", str(args.head_batch),
               "--head-seq-len", str(args.head_seq_len), "--mem-steps", str(args.mem_steps)]
    if args.extra_head_chunks:
        forward += ["--extra-head-chunks", *map(str, args.extra_head_chunks)]
    if args.compare_checkpointed:
        forward.append("--compare-checkpointed")
    if args.gradient_checkpointing:
        forward.append("--gradient-checkpointing")
    if args.data:
        forward += ["--data", str(args.data)]
    if head_chunk:
        forward += ["--head-chunk", str(head_chunk)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", only, "--cell", json.dumps(cell or {}), *forward]
    return measure_in_child(cmd, args.timeout)


def measure_in_child(cmd: list[str], timeout: float) -> dict:
    """Run a measuring child process (offline, quiet) and read its ``RESULT`` line; {"error": ...} if it failed."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - start
    return result


def matmul_peak(n: int, reps: int = 10, rounds: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.matmul on this machine (all torch threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e9


def step_flops(shapes: dict, batch: int, seq_len: int, loss_tokens: float) -> dict:
    """Useful FLOPs of one KD step (no recomputation), and the extra the chunked head recomputes.

    Matmuls only (norms, activations and softmaxes are ignored): 2 FLOPs per multiply-add.
    - student decoder: 6 * non-embedding params per position (forward 2, backward 4), all B x T positions;
    - teacher decoder: 2 * non-embedding params per position (forward only);
    - attention scores (QK^T and AV), causal: 2 * 2 * width * (t + 1) at position t, i.e. on average
      2 * width * (T + 1) per position per layer; x3 for the student (backward), x1 for the teacher;
    - LM heads on loss tokens only (what teacherfit evaluates): student 6 * d * V (forward + backward),
      teacher 2 * d * V. The fused head path computes each once; the checkpointed path (kd.fused_head
      false) recomputes both heads' forwards in backward: 4 * d * V per loss token more, reported
      separately as ``recompute (checkpointed path only)``.
    """
    positions = batch * seq_len
    attn_per_pos_layer = 2 * shapes["attn_width"] * (seq_len + 1)
    dv = shapes["hidden"] * shapes["vocab"]
    parts = {
        "student_decoder": 6 * shapes["student_nonemb"] * positions,
        "teacher_decoder": 2 * shapes["teacher_nonemb"] * positions,
        "attention_scores": positions * attn_per_pos_layer * (3 * shapes["student_layers"] + shapes["teacher_layers"]),
        "heads": 8 * dv * loss_tokens,
    }
    parts["useful"] = sum(parts.values())
    parts["recompute (checkpointed path only)"] = 4 * dv * loss_tokens
    return parts


def fmt_mib(mib: float) -> str:
    return f"{mib / 1024:,.2f} GiB" if abs(mib) >= 1024 else f"{mib:,.0f} MiB"


def show(rows, columns, args, title):
    print(f"\n{title}")
    if not rows:
        print("(no results)")
        return
    print_table(rows, columns)
    if args.markdown:
        print()
        print(markdown_table(rows, columns))


def part1(args, out: dict) -> dict | None:
    print(f"\n[1] teacherfit vs TRL GKD: batch {args.batch} x {args.seq_len}, off-policy (lmbda=0), forward KL "
          f"(beta=0), tau=1, no generation ({load_line()})")
    speed = spawn(args, "speed")
    mem = {} if args.no_memory else {"teacherfit": spawn(args, "teacherfit"), "trl": spawn(args, "trl")}
    for chunk in [] if args.no_memory else args.extra_head_chunks:
        mem[f"teacherfit (head_chunk {chunk})"] = spawn(args, "teacherfit", head_chunk=chunk)
    out["part1"] = {"speed": speed, "memory": mem}
    if "error" in speed:
        print(f"  speed run FAILED: {speed['error']}")
        return None

    w = args.warmup
    real, loss_tok = speed["real_tokens"][w:], speed["loss_tokens"][w:]
    runs = {"trl": speed["trl"]}
    for r in speed["teacherfit"]:
        name = ("teacherfit" if "teacherfit" not in runs
                else f"teacherfit (head_chunk {r['head_chunk']}{'' if r['fused'] else ', checkpointed'})")
        runs[name] = r
    trl_steps = speed["trl"]["step_s"][w:]
    rows = []
    for name, r in runs.items():
        steps = r["step_s"][w:]
        r["tok_s"] = sum(real) / sum(steps)
        r["paired"] = statistics.median(t / s for s, t in zip(steps, trl_steps))
        rows.append({"trainer": name, "s/step": f"{sum(steps) / len(steps):.2f}",
                     "fastest step s": f"{min(steps):.2f}", "real tok/s": r["tok_s"],
                     "response tok/s": sum(loss_tok) / sum(steps),
                     "vs TRL (median of per-step ratios)": "" if name == "trl" else f"{r['paired']:.2f}x",
                     "vs TRL (total time)": "" if name == "trl" else f"{r['tok_s'] / runs['trl']['tok_s']:.2f}x",
                     "KD loss step 1": f"{r['kd_loss'][0]:.5f}", "KD loss last": f"{r['kd_loss'][-1]:.5f}"})
    show(rows, ["trainer", "s/step", "fastest step s", "real tok/s", "response tok/s",
                "vs TRL (median of per-step ratios)", "vs TRL (total time)", "KD loss step 1", "KD loss last"], args,
         f"speed: one process, the trainers alternating step by step on identical batches; {w} warm-up + "
         f"{args.steps} measured steps, {sum(real) / len(real):.0f} real / {sum(loss_tok) / len(loss_tok):.0f} "
         "response tokens per step:")

    rows = []
    for name, r in mem.items():
        if "error" in r:
            rows.append({"trainer": name, "peak RSS": "FAILED: " + r["error"].splitlines()[-1][:100]})
            continue
        ratio = ("" if name == "trl" or "error" in mem["trl"]
                 else f"{r['increment_mib'] / mem['trl']['increment_mib']:.2f}x")
        rows.append({"trainer": name, "peak RSS": fmt_mib(r["peak_mib"]), "after load": fmt_mib(r["base_mib"]),
                     "increment": fmt_mib(r["increment_mib"]), "increment vs TRL": ratio})
    show(rows, ["trainer", "peak RSS", "after load", "increment", "increment vs TRL"], args,
         f"peak memory: each trainer alone in a fresh process, {w} + {args.mem_steps} steps; increment = peak RSS "
         "minus RSS after loading teacher and student:")

    tf, trl = runs["teacherfit"], runs["trl"]
    ratios = {"speed_median_paired": tf["paired"], "speed_total": tf["tok_s"] / trl["tok_s"]}
    verdict = f"speed {tf['paired']:.2f}x (target >= {SPEED_TARGET}x: {'met' if tf['paired'] >= SPEED_TARGET else 'MISSED'})"
    if mem and "error" not in mem["teacherfit"] and "error" not in mem["trl"]:
        m = mem["teacherfit"]["increment_mib"] / mem["trl"]["increment_mib"]
        ratios.update(memory_increment=m, memory_absolute=mem["teacherfit"]["peak_mib"] / mem["trl"]["peak_mib"])
        verdict += (f"; peak-memory increment {m:.2f}x (target <= {MEMORY_TARGET}x: "
                    f"{'met' if m <= MEMORY_TARGET else 'MISSED'}), absolute peak {ratios['memory_absolute']:.2f}x")
    out["part1_ratios"] = ratios
    print(f"teacherfit / TRL: {verdict}")
    print(f"TRL {trl.get('trl_version')} ({trl.get('trainer')}, optimizer {trl.get('optimizer')}); teacherfit "
          f"head_chunk {tf.get('head_chunk')}, optimizer {tf.get('optimizer')}")
    return {**tf, "loss_tokens": speed["loss_tokens"], "shapes": speed["shapes"], "trl_step_s": speed["trl"]["step_s"],
            "matmul_gflops": speed["matmul_gflops"]}


def part2(args, out: dict) -> None:
    print(f"\n[2] peak memory of one KD forward + backward, naive full logits vs teacherfit ({load_line()})")
    rows, cells = [], []
    for seq in args.kd_seq_lens:
        naive, tf = spawn(args, "kd-naive", {"seq": seq}), spawn(args, "kd-teacherfit", {"seq": seq})
        cells.append({"seq": seq, "naive": naive, "teacherfit": tf})
        vocab = tf.get("vocab", naive.get("vocab", "?"))
        rows.append(_kd_row(f"{args.kd_batch} x {seq}", naive, tf, extra={"V": f"{vocab:,} (real)"}))
    out["part2_seq"] = cells
    show(rows, ["B x T", "V", "loss tokens", "naive incr.", "teacherfit incr.", "ratio", "naive s", "teacherfit s",
                "KD loss naive / tf"], args,
         f"real models ({args.teacher} -> {args.student_layers} layers), packed examples, increment over the "
         "loaded models:")
    from transformers import AutoConfig

    from teacherfit.models import resolve_model

    rows, cells = [], []
    hidden = AutoConfig.from_pretrained(resolve_model(args.teacher).location).hidden_size
    seen: dict[str, tuple[int, float]] = {}  # kind -> (vocab, increment MiB) of the last cell that ran
    for vocab in sorted(args.vocabs):
        cell = {"vocab": vocab, "hidden": hidden}
        naive = _guarded(args, "head-naive", cell, seen.get("naive"))
        tf = _guarded(args, "head-teacherfit", cell, seen.get("teacherfit"))
        for kind, r in (("naive", naive), ("teacherfit", tf)):
            if "increment_mib" in r:
                seen[kind] = (vocab, r["increment_mib"])
        cells.append({"vocab": vocab, "naive": naive, "teacherfit": tf})
        rows.append(_kd_row(f"{args.head_batch} x {args.head_seq_len}", naive, tf, extra={"V": f"{vocab:,}"}))
    out["part2_vocab"] = cells
    show(rows, ["B x T", "V", "loss tokens", "naive incr.", "teacherfit incr.", "ratio", "naive s", "teacherfit s",
                "KD loss naive / tf"], args,
         f"synthetic LM head (d = {hidden}, random weights and hidden states, every position a loss token), "
         "increment over the heads:")


def mem_available_mib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def _guarded(args, only: str, cell: dict, last: tuple[int, float] | None) -> dict:
    """Run a synthetic-head cell unless its peak, extrapolated linearly in V from a smaller cell, would not fit."""
    if last is not None:
        need = last[1] * cell["vocab"] / last[0]
        avail = mem_available_mib()
        if need > avail - args.memory_margin * 1024:
            return {"skipped": f"not run: ~{fmt_mib(need)} by linear extrapolation, {fmt_mib(avail)} available",
                    "estimated_increment_mib": need}
    return spawn(args, only, cell)


def _kd_row(label, naive, tf, extra) -> dict:
    row = {"B x T": label, **extra}
    if "error" in naive or "error" in tf:
        row["ratio"] = "failed: " + (naive.get("error") or tf.get("error")).splitlines()[-1][:80]
        return row
    if "skipped" in naive or "skipped" in tf:
        for name, r in (("naive incr.", naive), ("teacherfit incr.", tf)):
            row[name] = f"(~{fmt_mib(r['estimated_increment_mib'])}, not run)" if "skipped" in r else fmt_mib(r["increment_mib"])
        if "skipped" not in tf:
            row["teacherfit s"] = f"{tf['seconds']:.1f}"
        row["loss tokens"] = tf.get("tokens", "")
        row["ratio"] = f"~{tf.get('increment_mib', tf.get('estimated_increment_mib')) / naive.get('increment_mib', naive.get('estimated_increment_mib')):.2f}x (est.)"
        return row
    row.update({"loss tokens": naive.get("loss_tokens", naive.get("tokens")),
                "naive incr.": fmt_mib(naive["increment_mib"]), "teacherfit incr.": fmt_mib(tf["increment_mib"]),
                "ratio": f"{tf['increment_mib'] / naive['increment_mib']:.2f}x",
                "naive s": f"{naive['seconds']:.1f}", "teacherfit s": f"{tf['seconds']:.1f}",
                "KD loss naive / tf": f"{naive['kd_loss']:.4f} / {tf['kd_loss']:.4f}"})
    return row


def part3(args, out: dict, tf: dict | None, peak: float) -> None:
    print(f"\n[3] utilisation of the teacherfit KD step ({load_line()})")
    if tf is None:  # part 1 not run: its speed run is the measurement
        speed = spawn(args, "speed")
        if "error" in speed:
            print(f"  speed run FAILED: {speed['error']}")
            return
        tf = {**speed["teacherfit"][0], "loss_tokens": speed["loss_tokens"], "shapes": speed["shapes"],
              "trl_step_s": speed["trl"]["step_s"], "matmul_gflops": speed["matmul_gflops"]}
    w = args.warmup
    during = tf.get("matmul_gflops", [])
    peak = max([peak, *during])  # the least disturbed measurement is the closest to the machine's peak
    steps = tf["step_s"][w:]
    secs, fastest = sum(steps) / len(steps), min(steps)
    loss_tokens = sum(tf["loss_tokens"][w:]) / len(tf["loss_tokens"][w:])
    flops = step_flops(tf["shapes"], args.batch, args.seq_len, loss_tokens)
    achieved = flops["useful"] / secs / 1e9
    out["part3"] = {"flops_per_step": flops, "s_per_step": secs, "fastest_step_s": fastest,
                    "achieved_gflops": achieved, "achieved_gflops_fastest": flops["useful"] / fastest / 1e9,
                    "peak_gflops": peak, "utilisation": achieved / peak,
                    "utilisation_fastest": flops["useful"] / fastest / 1e9 / peak}
    rows = [{"term": k.replace("_", " "), "GFLOP/step": v / 1e9} for k, v in flops.items()]
    show(rows, ["term", "GFLOP/step"], args,
         f"analytic FLOPs per step (B {args.batch} x T {args.seq_len}, {loss_tokens:.0f} loss tokens/step, "
         f"student {tf['shapes']['student_nonemb'] / 1e6:.1f}M / teacher {tf['shapes']['teacher_nonemb'] / 1e6:.1f}M "
         "non-embedding params; see step_flops):")

    def row(label, seconds, extra=0.0):
        rate = (flops["useful"] + extra) / seconds / 1e9
        return {"measure": label, "s/step": f"{seconds:.2f}", "GFLOP/s": rate, "of fp32 matmul peak": f"{rate / peak:.1%}"}

    rows = [row("teacherfit step, mean", secs), row("teacherfit step, fastest", fastest)]
    if not tf.get("fused", True):
        rows.append(row("  fastest, counting the head recompute", fastest, flops["recompute (checkpointed path only)"]))
    trl_steps = tf.get("trl_step_s", [])[w:]
    if trl_steps:
        rows += [row("TRL GKD step, mean (same useful FLOPs)", sum(trl_steps) / len(trl_steps)),
                 row("TRL GKD step, fastest", min(trl_steps))]
    rows.append({"measure": f"torch.matmul {args.peak_size}^2 fp32, best of the run (peak)", "s/step": "",
                 "GFLOP/s": peak, "of fp32 matmul peak": "100.0%"})
    if during:
        med = statistics.median(during)
        rows.append({"measure": "torch.matmul between the steps, median", "s/step": "", "GFLOP/s": med,
                     "of fp32 matmul peak": f"{med / peak:.1%}"})
    show(rows, ["measure", "s/step", "GFLOP/s", "of fp32 matmul peak"], args, "achieved:")


def main() -> None:
    args = parse_args()
    if args.only:
        run_child(args)
        return
    out: dict = {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"teacher {args.teacher}, student = its {args.student_layers} layers; fp32, CPU, no bf16, no gradient "
          f"checkpointing; data {(args.data or default_data()).name}")
    print(f"machine: {machine_line()}")
    out["load_before"] = load_line()
    print(f"before: {out['load_before']}")
    started = time.perf_counter()
    peak = matmul_peak(args.peak_size)
    out["matmul_peak_gflops"] = peak
    print(f"fp32 matmul peak ({args.peak_size}^2, torch.matmul, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    tf = part1(args, out) if 1 in args.parts else None
    if 2 in args.parts:
        part2(args, out)
    if 3 in args.parts:
        peak = max(peak, matmul_peak(args.peak_size))
        out["matmul_peak_gflops"] = peak
        part3(args, out, tf, peak)
    out["load_after"] = load_line()
    out["seconds"] = time.perf_counter() - started
    print(f"\nafter: {out['load_after']}; total {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
