"""GPU check for distillation: bf16 steps of the product's ``Trainer.step``, and the fused KD head against Liger-Kernel.

Random-initialised real architectures, built from configs only (nothing downloaded: the device machines reach no
hub). Two parts, each timed with the GPU synchronised around every call:

1. **train**: distillation steps through ``teacherfit.distill.train.Trainer.step`` (the product's own training step,
   built by ``build_trainer`` on the Accelerator of ``launch.training_accelerator``: bf16 autocast over fp32 master
   weights on CUDA), a Qwen2.5-1.5B-shaped teacher (bf16, frozen, ``OnlineTeacher``) and a Qwen2.5-0.5B-shaped
   student (V = 151,936 for both), pure forward-KL KD (kd.lambda 1, tau 1), one micro-batch of ``--batch`` x
   ``--seq-len`` random tokens per step (the first quarter of each row a prompt, label -100). Reported: tokens/s
   (every position) and response tokens/s over the measured steps, and the peak CUDA memory (absolute, and the
   increment over the memory after the models were built). Once with the fused head (kd.fused_head, the default)
   and once with the checkpointed head chunks.
2. **head**: one forward + backward of the KD loss of an LM head, ``--head-tokens`` tokens, hidden ``--hidden``,
   V = ``--vocab`` (defaults: 8,192 tokens, 2,048, 128,256: Llama-3's vocabulary), random hidden states and weights,
   a tenth of the positions ignored (label -100): teacherfit's ``chunked_head_losses`` (fused=True, its default
   chunk for this V, CE logged without gradient as ``DistillModule`` calls it at kd.lambda 1) against Liger-Kernel's
   ``LigerFusedLinearJSD``. Timed in bf16 (hidden states and both heads' weights bf16) and with fp32 weights under
   bf16 autocast (how teacherfit trains): milliseconds per forward + backward and the peak CUDA memory over the
   inputs (the gradients of the hidden states and of the student head included).

   Loss and gradient agreement, in bf16, against an fp32 reference on the same (bf16-valued) inputs with full
   logits, at the settings where the two define the same quantity. Liger's ``jsd_beta`` has teacherfit's (and TRL's)
   convention: beta = 0 is forward KL(p_T || p_S), beta = 1 reverse KL(p_S || p_T), otherwise
   beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S; both average over the kept tokens.
   teacherfit multiplies by tau^2 and Liger does not, so teacherfit's loss and gradients are divided by tau^2 before
   comparing. Settings: forward_kl tau 1 (beta 0), forward_kl tau 2 (beta 0, temperature 2), generalized_jsd beta 0.5
   tau 1 and reverse_kl tau 1 (beta 1).

Liger-Kernel is optional: if ``liger_kernel`` does not import (or there is no GPU: its kernels are Triton), the script
says so and skips its rows. Prints Markdown tables and writes the results as JSON to ``--out`` (default
``$OUT/gpu_check_distill.json`` when ``OUT`` is set).

    python benchmarks/gpu_check_distill.py            # a CUDA machine: bf16, about a minute or two on an H200
    python benchmarks/gpu_check_distill.py --tiny     # any machine: tiny shapes, fp32 on the CPU (a smoke run)

On a device machine the image lacks some of teacherfit's dependencies and liger-kernel: carry them as wheels
(pydantic, pydantic-core, annotated-types, typing-inspection, openai and its requirements, liger-kernel) and run
with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import markdown_table

LIGER_SETTINGS = [  # (name, teacherfit divergence, its kwargs, Liger jsd_beta, temperature)
    ("forward KL, tau 1", "forward_kl", {}, 0.0, 1.0),
    ("forward KL, tau 2", "forward_kl", {}, 0.0, 2.0),
    ("JSD beta 0.5, tau 1", "generalized_jsd", {"beta": 0.5}, 0.5, 1.0),
    ("reverse KL, tau 1", "reverse_kl", {}, 1.0, 1.0),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, fp32 on the CPU (a smoke run anywhere)")
    ap.add_argument("--parts", nargs="+", default=["train", "head"], choices=["train", "head"],
                    help="which parts to run (default: both)")
    ap.add_argument("--batch", type=int, default=None, help="train: rows per step (default 4; tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="train: tokens per row (default 1024; tiny 64)")
    ap.add_argument("--steps", type=int, default=5, help="train: measured steps per variant (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="train: unmeasured first steps (default: %(default)s)")
    ap.add_argument("--head-tokens", type=int, default=None, help="head: tokens (default 8192; tiny 256)")
    ap.add_argument("--hidden", type=int, default=None, help="head: hidden size (default 2048; tiny 64)")
    ap.add_argument("--vocab", type=int, default=None, help="head: vocabulary size (default 128256; tiny 1000)")
    ap.add_argument("--reps", type=int, default=10, help="head: timed repetitions (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results file (default: $OUT/gpu_check_distill.json when OUT is set, else none)")
    args = ap.parse_args(argv)
    big = not args.tiny
    for name, full, tiny in (("batch", 4, 2), ("seq_len", 1024, 64), ("head_tokens", 8192, 256),
                             ("hidden", 2048, 64), ("vocab", 128256, 1000)):
        if getattr(args, name) is None:
            setattr(args, name, full if big else tiny)
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "gpu_check_distill.json"
    return args


def device_of(args) -> torch.device:
    if args.tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- part 1: Trainer.step on real architectures


def qwen_configs(tiny: bool):
    """(teacher, student) Qwen2 configs: Qwen2.5-1.5B's and Qwen2.5-0.5B's shapes, or tiny ones."""
    from transformers import Qwen2Config

    if tiny:
        common = {"vocab_size": 1000, "max_position_embeddings": 512, "tie_word_embeddings": True}
        teacher = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 6,
                   "num_key_value_heads": 2}
        student = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2}
    else:
        common = {"vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
                  "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}
        teacher = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                   "num_key_value_heads": 2}
        student = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2}
    return (Qwen2Config(**teacher, **common, attn_implementation="sdpa", use_cache=False),
            Qwen2Config(**student, **common, attn_implementation="sdpa", use_cache=False))


def train_config(args, fused: bool):
    from teacherfit.config import (
        DistillConfig,
        KDConfig,
        ModelOptions,
        TrainData,
        TrainOptions,
    )

    kd = KDConfig(**{"lambda": 1.0, "w_attn": 0.0, "w_pred": 1.0, "divergence": "forward_kl", "temperature": 1.0,
                     "fused_head": fused})
    train = TrainOptions(lr=1e-5, batch_size=args.batch, grad_accum=1, warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, max_length=max(16, args.seq_len))
    models = ModelOptions(device="cpu", dtype="float32") if args.tiny else ModelOptions(device="auto", dtype="auto")
    return DistillConfig(student="random-qwen2.5-0.5b", teacher="random-qwen2.5-1.5b", data=TrainData(), kd=kd,
                         train=train, models=models)


def random_micros(args, vocab: int, n: int):
    from teacherfit.distill.examples import Micro

    gen = torch.Generator().manual_seed(0)
    micros = []
    for k in range(n):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq_len // 4] = -100  # the prompt
        micros.append(Micro([f"{k}-{r}" for r in range(args.batch)], ids, torch.ones_like(ids), labels))
    return micros


def part_train(args, device: torch.device) -> dict:
    from transformers import Qwen2ForCausalLM

    from teacherfit.distill.teachers import OnlineTeacher
    from teacherfit.distill.train import build_trainer
    from teacherfit.launch import training_accelerator

    t_cfg, s_cfg = qwen_configs(args.tiny)
    accelerator = training_accelerator(train_config(args, True).models, train_config(args, True).train)
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Qwen2ForCausalLM(t_cfg)
    teacher = teacher.to(torch.float32 if args.tiny else torch.bfloat16)
    micros = random_micros(args, s_cfg.vocab_size, args.warmup + args.steps)
    out = {"teacher": {"params": sum(p.numel() for p in teacher.parameters()), "layers": t_cfg.num_hidden_layers,
                       "hidden": t_cfg.hidden_size, "dtype": str(next(teacher.parameters()).dtype)},
           "vocab": s_cfg.vocab_size, "batch": args.batch, "seq_len": args.seq_len,
           "loss_tokens_per_step": micros[0].loss_tokens, "mixed_precision": str(accelerator.mixed_precision),
           "variants": []}
    for fused in (True, False):
        name = "fused head" if fused else "checkpointed head (kd.fused_head=false)"
        row: dict = {"variant": name}
        try:
            torch.manual_seed(1)
            with torch.device(device):
                student = Qwen2ForCausalLM(s_cfg)  # fp32 master weights, as build_student makes them
            student.train()
            out["student"] = {"params": sum(p.numel() for p in student.parameters()),
                              "layers": s_cfg.num_hidden_layers, "hidden": s_cfg.hidden_size}

            def teacher_factory(acc):
                return OnlineTeacher(teacher, vocab=None, attn_layers=None, device=acc.device,
                                     student_device=acc.device)

            trainer = build_trainer(train_config(args, fused), accelerator, student, teacher_factory, vocab=None,
                                    layer_map=None, total_steps=1_000_000)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            step_s, kd = [], []
            for micro in micros:
                sync(device)
                start = time.perf_counter()
                log = trainer.step([micro])
                sync(device)
                step_s.append(time.perf_counter() - start)
                kd.append(log["kd"])
            measured = step_s[args.warmup:] or step_s
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            positions = args.batch * args.seq_len
            row.update({"step_s": step_s, "mean_step_s": statistics.mean(measured), "min_step_s": min(measured),
                        "tokens_per_s": positions / statistics.mean(measured),
                        "response_tokens_per_s": micros[0].loss_tokens / statistics.mean(measured),
                        "kd_first": kd[0], "kd_last": kd[-1], "finite": all(math.isfinite(x) for x in kd),
                        "after_load_mib": mib(base), "peak_mib": mib(peak),
                        "increment_mib": None if peak is None else mib(peak - base),
                        "distribution": getattr(trainer, "distribution", None)})
            del trainer, student
            accelerator.free_memory()  # drops the prepared model / optimizer / scheduler it keeps
        except Exception as err:  # noqa: BLE001  (reported in the results; the other variant still runs)
            row["error"] = f"{type(err).__name__}: {err}"
        free(device)
        out["variants"].append(row)
    return out


# ---------------------------------------------------------------- part 2: the fused KD head against Liger-Kernel


def load_liger(device: torch.device):
    """(LigerFusedLinearJSD, version) or (None, why not)."""
    try:
        import liger_kernel
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as err:  # noqa: BLE001  (ImportError, or Triton failing to initialise)
        return None, f"liger_kernel does not import ({type(err).__name__}: {err})"
    if device.type != "cuda":
        return None, "Liger-Kernel's kernels are Triton: GPU only (skipped on the CPU)"
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("liger-kernel")
    except PackageNotFoundError:
        ver = getattr(liger_kernel, "__version__", "?")
    return LigerFusedLinearJSD, ver


def head_inputs(args, device: torch.device, dtype: torch.dtype):
    """Hidden states (student's requires grad), the two heads' weights, labels with a tenth ignored."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = args.head_tokens, args.hidden, args.vocab
    h = torch.randn(n, d, generator=gen)
    t_h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * 0.02
    t_w = torch.randn(v, d, generator=gen) * 0.03  # a sharper teacher
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.1] = -100
    return (h.to(device, dtype).requires_grad_(True), t_h.to(device, dtype), w.to(device, dtype), t_w.to(device, dtype),
            labels.to(device))


def teacherfit_head_loss(h, w, t_h, t_w, labels, divergence, kwargs, tau, chunk):
    """teacherfit's KD loss of the head as ``DistillModule`` computes it at kd.lambda 1: kd_sum / tokens (x tau^2)."""
    from teacherfit.distill.losses import chunked_head_losses

    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    head.weight = w
    t_head = torch.nn.Linear(t_w.shape[1], t_w.shape[0], bias=False, device=t_w.device, dtype=t_w.dtype)
    t_head.weight = torch.nn.Parameter(t_w, requires_grad=False)
    sums = chunked_head_losses(h, head, labels, teacher_hidden=t_h, teacher_head=t_head, divergence=divergence,
                               divergence_kwargs=kwargs or None, temperature=tau, chunk_size=chunk, kd_weight=1.0,
                               ce_weight=0.0, fused=True)
    return sums["loss_sum"] / max(sums["n_tokens"], 1)


def reference_loss(h, w, t_h, t_w, labels, beta: float, tau: float):
    """fp32, full logits: the per-token mean of Liger's generalized JSD at tau (no tau^2)."""
    keep = labels != -100
    s = torch.log_softmax((h[keep].float() @ w.float().t()) / tau, -1)
    t = torch.log_softmax((t_h[keep].float() @ t_w.float().t()) / tau, -1)
    if beta == 0.0:
        d = (t.exp() * (t - s)).sum(-1)
    elif beta == 1.0:
        d = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
        d = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return d.mean()


def fwd_bwd(loss_fn, params) -> tuple[float, list]:
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), [p.grad.detach().float().clone() for p in params]


def timed(loss_fn, params, device, reps: int) -> dict:
    """Milliseconds per forward + backward (median and best of ``reps`` after one warm-up) and the peak memory over
    what was allocated before (the inputs)."""
    fwd_bwd(loss_fn, params)
    for p in params:
        p.grad = None
    free(device)
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = []
    for _ in range(reps):
        for p in params:
            p.grad = None
        sync(device)
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        sync(device)
        ms.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    for p in params:
        p.grad = None
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms": ms,
            "peak_increment_mib": None if peak is None else mib(peak - base), "inputs_mib": mib(base)}


def part_head(args, device: torch.device) -> dict:
    from teacherfit.config import KDConfig

    liger_cls, liger_info = load_liger(device)
    chunk = KDConfig().chunk_for(args.vocab)
    n, d, v = args.head_tokens, args.hidden, args.vocab
    out = {"tokens": n, "hidden": d, "vocab": v, "teacherfit_chunk": chunk, "liger": liger_info if liger_cls is None
           else {"version": liger_info}, "timing": [], "agreement": []}
    print(f"\nLiger-Kernel: {liger_info if liger_cls is None else 'version ' + liger_info}")

    low = torch.float32 if args.tiny else torch.bfloat16
    # (name, dtype of the inputs, under bf16 autocast): the low-precision tensors themselves (bf16 on a GPU), and
    # fp32 weights under bf16 autocast, as the product trains (accelerate's mixed precision over fp32 masters)
    modes = [("bf16" if not args.tiny else "fp32", low, False), ("fp32 weights, bf16 autocast", torch.float32, True)]
    for mode, dtype, autocast in modes:
        timing, agreement = head_mode(args, device, liger_cls, chunk, mode, dtype, autocast)
        out["timing"] += timing
        out["agreement"] += agreement
        free(device)
    return out


def head_mode(args, device, liger_cls, chunk: int, mode: str, dtype: torch.dtype, autocast: bool):
    """One input mode: the timing rows (forward KL at tau 1, Liger's jsd_beta 0), then the agreement rows (each
    implementation in this mode against the fp32 full-logit reference on the same tensors)."""
    h, t_h, w, t_w, labels = head_inputs(args, device, dtype)
    w = torch.nn.Parameter(w)
    wrap = with_autocast(device) if autocast else (lambda fn: fn)

    def teacherfit(divergence="forward_kl", kwargs=None, tau=1.0):
        return lambda: teacherfit_head_loss(h, w, t_h, t_w, labels, divergence, kwargs or {}, tau, chunk) / tau**2

    def liger(beta=0.0, tau=1.0):
        f = liger_cls(jsd_beta=beta, ignore_index=-100, temperature=tau)
        return lambda: f(h, w, t_h, t_w, labels)

    timing = []
    impls = [("teacherfit chunked_head_losses (fused)", teacherfit)]
    if liger_cls is not None:
        impls.append(("Liger LigerFusedLinearJSD", liger))
    for name, make in impls:
        row = {"impl": name, "mode": mode}
        try:
            row.update(timed(wrap(make()), [h, w], device, args.reps))
        except Exception as err:  # noqa: BLE001  (an OOM or a kernel failure: reported, the next row runs)
            row["error"] = f"{type(err).__name__}: {err}"
        timing.append(row)
        free(device)

    agreement = []
    for name, divergence, kwargs, beta, tau in LIGER_SETTINGS:
        row = {"setting": name, "mode": mode,
               "teacherfit": f"{divergence} {kwargs or ''} tau {tau} (/ tau^2)".replace("  ", " "),
               "liger": f"jsd_beta {beta}, temperature {tau}"}
        try:
            ref, (ref_gh, ref_gw) = fwd_bwd(
                lambda beta=beta, tau=tau: reference_loss(h, w, t_h, t_w, labels, beta, tau), [h, w])
            tf, (tf_gh, tf_gw) = fwd_bwd(wrap(teacherfit(divergence, kwargs, tau)), [h, w])
            row.update({"reference": ref, "teacherfit_loss": tf, "teacherfit_abs_diff": abs(tf - ref),
                        "teacherfit_grad_h_rel": rel(tf_gh, ref_gh), "teacherfit_grad_w_rel": rel(tf_gw, ref_gw)})
            if liger_cls is not None:
                lg, (lg_gh, lg_gw) = fwd_bwd(wrap(liger(beta, tau)), [h, w])
                row.update({"liger_loss": lg, "liger_abs_diff": abs(lg - ref), "teacherfit_vs_liger": abs(tf - lg),
                            "liger_grad_h_rel": rel(lg_gh, ref_gh), "liger_grad_w_rel": rel(lg_gw, ref_gw)})
        except Exception as err:  # noqa: BLE001  (reported, the next setting runs)
            row["error"] = f"{type(err).__name__}: {err}"
        agreement.append(row)
        free(device)
    return timing, agreement


def with_autocast(device: torch.device):
    """fn -> fn run under bf16 autocast on ``device``'s type."""

    def wrap(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()

        return run

    return wrap


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- report


def fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def report(results: dict) -> None:
    train = results.get("train")
    if train:
        if "error" in train:
            print(f"\n[1] train: FAILED: {train['error']}")
        else:
            print(f"\n[1] Trainer.step, teacher {train['teacher']['params'] / 1e6:,.2f}M params "
                  f"({train['teacher']['dtype']}) -> student {train.get('student', {}).get('params', 0) / 1e6:,.2f}M, "
                  f"V {train['vocab']:,}, {train['batch']} x {train['seq_len']} tokens/step "
                  f"({train['loss_tokens_per_step']:,} response), mixed precision {train['mixed_precision']}\n")
            rows = [{"variant": r["variant"], "s/step": fmt(r.get("mean_step_s"), ".3f"),
                     "tokens/s": fmt(r.get("tokens_per_s"), ",.0f"),
                     "response tokens/s": fmt(r.get("response_tokens_per_s"), ",.0f"),
                     "peak CUDA MiB": fmt(r.get("peak_mib"), ",.0f"), "after load MiB": fmt(r.get("after_load_mib"), ",.0f"),
                     "KD first / last": (f"{r['kd_first']:.4f} / {r['kd_last']:.4f}" if "kd_first" in r
                                         else "FAILED: " + r.get("error", "")[:120])}
                    for r in train["variants"]]
            print(markdown_table(rows, list(rows[0])))
    head = results.get("head")
    if head:
        if "error" in head:
            print(f"\n[2] head: FAILED: {head['error']}")
            return
        print(f"\n[2] KD head forward + backward, {head['tokens']:,} tokens x d {head['hidden']:,} -> V "
              f"{head['vocab']:,} (teacherfit chunk {head['teacherfit_chunk']}), forward KL tau 1\n")
        rows = [{"implementation": r["impl"], "mode": r["mode"], "ms (median)": fmt(r.get("ms_median"), ".1f"),
                 "ms (best)": fmt(r.get("ms_min"), ".1f"),
                 "peak over inputs MiB": fmt(r.get("peak_increment_mib"), ",.0f") if "error" not in r
                 else "FAILED: " + r["error"][:120]} for r in head["timing"]]
        print(markdown_table(rows, list(rows[0])))
        print("\nloss agreement against an fp32 full-logit reference (same inputs; teacherfit / tau^2):\n")
        rows = []
        for r in head["agreement"]:
            if "error" in r:
                rows.append({"setting": r["setting"], "mode": r["mode"], "reference": "FAILED: " + r["error"][:120]})
                continue
            rows.append({"setting": r["setting"], "mode": r["mode"], "reference": fmt(r["reference"], ".6f"),
                         "teacherfit": fmt(r["teacherfit_loss"], ".6f"), "tf - ref (abs)": fmt(r["teacherfit_abs_diff"], ".2e"),
                         "Liger": fmt(r.get("liger_loss"), ".6f"), "Liger - ref (abs)": fmt(r.get("liger_abs_diff"), ".2e"),
                         "tf - Liger (abs)": fmt(r.get("teacherfit_vs_liger"), ".2e"),
                         "grad h rel. tf / Liger": f"{r['teacherfit_grad_h_rel']:.1e} / {fmt(r.get('liger_grad_h_rel'), '.1e')}",
                         "grad W rel. tf / Liger": f"{r['teacherfit_grad_w_rel']:.1e} / {fmt(r.get('liger_grad_w_rel'), '.1e')}"})
        print(markdown_table(rows, ["setting", "mode", "reference", "teacherfit", "tf - ref (abs)", "Liger", "Liger - ref (abs)",
                                    "tf - Liger (abs)", "grad h rel. tf / Liger", "grad W rel. tf / Liger"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    device = device_of(args)
    import transformers

    transformers.logging.set_verbosity_error()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "tiny": args.tiny, "python": sys.version.split()[0]}
    print("gpu_check_distill: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    results: dict = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    for part, fn in (("train", part_train), ("head", part_head)):
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        try:
            results[part] = fn(args, device)
        except Exception as err:  # noqa: BLE001  (reported; the other part still runs)
            results[part] = {"error": f"{type(err).__name__}: {err}"}
        results[part]["seconds"] = round(time.perf_counter() - t0, 1)
        free(device)
    results["seconds"] = round(time.perf_counter() - started, 1)
    report(results)
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
