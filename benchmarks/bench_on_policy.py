"""On-policy distillation: teacherfit's on-policy step against TRL's GKD trainer with ``lmbda=1``.

Every step of both trainers samples the batch's responses from the live student (fully on-policy), then runs
one KD step on them: teacher forward, student forward, forward KL over the generated tokens, backward, clip
1.0, AdamW. Teacher: a packaged model (default SmolLM2-135M-Instruct, vocab 49152); student: a half-depth copy
of it (the product's ``build_student``: ``shrink_layers`` with ``every_other``, 15 of 30 layers, same
tokenizer). fp32 on CPU, one process, no bf16, no gradient checkpointing. Prompts: the quickstart's SmolLM2
responses tokenized with the chat template by ``tokenize_records``, in file order (cycled), each row's prompt
being everything before its response (``rollouts.response_start``); ``--prompt-len`` leaves longer prompts out.

- **teacherfit**: what ``distill.train._train`` runs per optimizer step with ``kd.on_policy=1``:
  ``OnPolicy.examples_for(step)`` (the ``TransformersRollouts`` engine: ``model.generate`` on the live student,
  eval mode, KV cache on, all ``--batch`` prompts in one left-padded call; ``rollout.buffer_steps`` = ``--buffer-steps``; 1: every
  step generates from that step's weights), ``collate``, then ``Trainer.step(micros)``. The Accelerator comes
  from ``launch.training_accelerator``, the trainer from ``build_trainer`` (``OnlineTeacher`` +
  ``DistillModule``, kd.lambda 1, kd.w_attn 0, forward KL, tau 1, grad_accum 1, AdamW weight decay 0, warm-up
  0 and a cosine over 10^6 steps: a constant learning rate like TRL's), the engine from ``build_engine``.
- **TRL**: ``GKDTrainer.train()`` with ``lmbda=1`` (``training_step`` calls ``generate_on_policy_outputs`` on
  every batch: ``model.generate`` on the student with TRL's own ``GenerationConfig``: ``do_sample``,
  ``temperature``, ``top_k=0``, ``top_p=1``, ``max_new_tokens``, KV cache on), ``beta=0``: in
  ``generalized_jsd_loss``, beta 0 is ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)`` =
  KL(p_teacher || p_student), the forward KL (beta 1 is the reverse KL; TRL's default, 0.5, is the JSD);
  ``seq_kd`` off, bf16 and gradient checkpointing off, constant learning rate, weight decay 0, clip 1.0.

The same work on both sides:

- the same prompts in the same order, ``--batch`` per step, the same sampling temperature (``--temperature``;
  TRL's GKD ``temperature`` is the generation temperature only: its loss runs at tau 1, as ``kd.temperature``
  1 here), top-p 1 and no top-k on both (TRL sets ``top_k=0``; the product's engine passes ``top_k=0`` itself);
- exactly ``--max-new-tokens`` generated per row on both: ``min_new_tokens = max_new_tokens`` in TRL's
  ``GenerationConfig`` and in the product engine's ``generation_defaults`` (transformers then masks every stop
  id until the last token), unless ``--stop-at-eos``; then each side stops where its samples end, and tokens/s
  counts each side's real tokens;
- TRL's collator gives each row ``--max-new-tokens`` placeholder labels, so that the loss normaliser TRL's
  Trainer counts from the collated batch before generation (``num_items_in_batch``) is the real number of
  generated tokens (without it, TRL would divide the on-policy loss by the dataset's response lengths).

Speed: both trainers in ONE process, alternating step by step on the same prompts (after each TRL step, the
teacherfit step of the same prompts, on its own copy of the student), so other jobs on a shared machine slow
both alike. Reported per side: step time (median), tokens/s (real tokens: prompts + generated, pads left out),
and the generation share of the step (teacherfit: the ``rollout_s`` that ``examples_for`` reports, the engine's
generate call; TRL: its ``generate_on_policy_outputs`` call, timed by a wrapper). Memory: each trainer alone in
a fresh process (the script re-invokes itself with ``--only``); peak RSS via ``VmHWM``, reset through
``/proc/self/clear_refs`` after the models are loaded; increment = peak minus the RSS after loading.
Targets: >= 1.5x TRL tokens/s, <= 0.7x TRL peak-memory increment. TRL (with ``datasets``) must be importable,
e.g. ``PYTHONPATH=/path/to/trl-site``; ``trl.experimental.gkd`` (TRL >= 1.x) or ``trl`` (older) is used.

Work that stays different: TRL computes the full [B, T, V] logits of both models at every position (prompt and
pad included) and the divergence over all of them before masking, teacherfit the head and divergence on the
generated tokens only (that is the product's design, not extra work asked of TRL); TRL samples in train mode
(dropout off: the same arithmetic), teacherfit in eval mode; each side samples its own tokens (its own RNG), so
the tokens differ but their counts do not; with forced lengths, teacherfit masks all its stop ids (<|endoftext|>
and <|im_end|> for SmolLM2) until the last token, TRL only its eos id (<|im_end|>), so TRL may sample
<|endoftext|> inside a response and go on. TRL's collation happens before its step clock starts, teacherfit's
``collate`` inside (a few ms).

    python benchmarks/bench_on_policy.py --markdown                 # 1 + 6 steps, batch 4, 64 new tokens
    python benchmarks/bench_on_policy.py --max-new-tokens 128 --batch 8
    python benchmarks/bench_on_policy.py --tiny --steps 2 --warmup 1  # tiny random models: a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_distill import RESULT_PREFIX, PeakRSS, default_data, fmt_mib, measure_in_child, resident, show
from common import load_line, machine_line

DEFAULT_TEACHER = "smollm2-135m-instruct"
SPEED_TARGET, MEMORY_TARGET = 1.5, 0.7
# warm-up 0 and a cosine over 10^6 steps: the learning rate stays at --lr for a benchmark's few steps (as TRL's
# constant schedule); also the OnPolicy schedule's length (only its buffer windows read it)
SCHEDULE_STEPS = 1_000_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model (default: %(default)s)")
    ap.add_argument("--student-layers", default="every_other",
                    help="student = these layers of the teacher (StudentInit.layers; default: %(default)s)")
    ap.add_argument("--data", type=Path, default=None,
                    help="response set JSONL whose prompts are used (default: quickstart SmolLM2 responses)")
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="tokens the student generates per prompt (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="leave out prompts longer than this many tokens (default: keep all)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature, both sides (TRL GKD's temperature, rollout.temperature; "
                         "default: %(default)s)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let generation stop at a stop token (lengths then differ between the sides; tokens/s "
                         "counts each side's real tokens, and TRL's loss normaliser is off)")
    ap.add_argument("--buffer-steps", type=int, default=1,
                    help="teacherfit rollout.buffer_steps: the prompts of this many steps sampled in one generate "
                         "call (TRL's GKD has no buffer: compare the total-time column; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured first steps (default: %(default)s)")
    ap.add_argument("--mem-steps", type=int, default=None,
                    help="memory runs: steps after the warm-up (default: --steps)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate, both trainers (default: %(default)s)")
    ap.add_argument("--head-chunk", type=int, default=None, help="teacherfit kd.head_chunk (default: KDConfig's)")
    ap.add_argument("--no-memory", action="store_true", help="the speed run only (skip the two memory runs)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny randomly initialised Llama models (2-layer teacher, 1-layer student, the teacher's "
                         "tokenizer): a smoke test in seconds, numbers meaningless")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess (default: %(default)s)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown as well")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--only", default=None, choices=["speed", "trl", "teacherfit"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_steps is None:
        args.mem_steps = args.steps
    return args


# ---------------------------------------------------------------- models, prompts, config (child processes)


def student_init(args):
    from teacherfit.config import StudentInit

    return StudentInit(layers=args.student_layers)


def tiny_teacher(tokenizer):
    """A 2-layer Llama with the tokenizer's vocabulary, random weights (seeded: every call gives the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    return LlamaForCausalLM(cfg).float().eval()


def load_teacher(args):
    """(teacher, tokenizer): the frozen teacher, fp32 on CPU, its weights resident."""
    from teacherfit.models import load_model, load_tokenizer

    if args.tiny:
        tok = load_tokenizer(args.teacher)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        teacher = tiny_teacher(tok)
    else:
        loaded = load_model(args.teacher, device="cpu", dtype="float32")
        teacher, tok = loaded.model, loaded.tokenizer
    teacher.config.use_cache = False
    resident(teacher)
    return teacher, tok


def load_student(args, tokenizer):
    """A trainable half-depth copy of the teacher, fp32 on CPU (the product's ``build_student``; ``--tiny``:
    ``shrink_layers`` of the tiny teacher), with the sampling settings both sides share (``match_sampling``)."""
    if args.tiny:
        from teacherfit.pipelines.recipe import shrink_layers

        student = shrink_layers(tiny_teacher(tokenizer), student_init(args)).train()
        student.config.use_cache = False
    else:
        from teacherfit.pipelines.recipe import build_student

        student, _tok, _prov = build_student(bench_config(args, max_length=2048))
    resident(student)
    match_sampling(student.generation_config, args)
    return student


def match_sampling(gen_config, args) -> None:
    """What the two sides' generate calls must share beyond what each sets itself: no top-k (TRL sets top_k=0;
    the product's engine sets none, so transformers would fill in its default 50) and, unless --stop-at-eos,
    exactly --max-new-tokens per row (transformers' MinNewTokensLengthLogitsProcessor masks every stop id)."""
    gen_config.top_k = 0
    gen_config.min_new_tokens = None if args.stop_at_eos else args.max_new_tokens


def bench_config(args, max_length: int):
    """The DistillConfig of teacherfit's side: pure KD (kd.lambda 1, no attention term), forward KL at tau 1,
    fully on-policy (kd.on_policy 1) with the transformers engine, --max-new-tokens at --temperature, one
    buffer per step; one micro-batch of --batch rows per step, fp32 on the CPU."""
    from teacherfit.config import (
        DistillConfig,
        KDConfig,
        ModelOptions,
        RolloutOptions,
        TrainData,
        TrainOptions,
    )

    kd = KDConfig(**{"lambda": 1.0, "w_attn": 0.0, "w_pred": 1.0, "divergence": "forward_kl", "temperature": 1.0,
                     "on_policy": 1.0, "head_chunk": args.head_chunk})
    train = TrainOptions(lr=args.lr, batch_size=args.batch, grad_accum=1, warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, max_length=max(16, max_length), gradient_checkpointing=False, seed=0)
    rollout = RolloutOptions(engine="transformers", max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=1.0, buffer_steps=args.buffer_steps)
    return DistillConfig(student=args.teacher, teacher=args.teacher, student_init=student_init(args), data=TrainData(),
                         kd=kd, train=train, rollout=rollout, models=ModelOptions(device="cpu", dtype="float32"))


def prompt_examples(args, tokenizer, n_steps: int):
    """The examples of ``n_steps`` steps, ``--batch`` per step, in file order (cycled), prompts no longer than
    --prompt-len; and the longest prompt among them."""
    from teacherfit.config import ResponseSetConfig, TrainData
    from teacherfit.distill.examples import tokenize_records, training_records
    from teacherfit.distill.rollouts import response_start

    data = TrainData(responses=[ResponseSetConfig(name="bench", path=args.data or default_data())])
    examples, _stats = tokenize_records(training_records(data), tokenizer, 100_000)
    cap = args.prompt_len or 100_000
    examples = [ex for ex in examples if response_start(ex.tokens.labels) <= cap]
    if not examples:
        raise SystemExit(f"no prompt of at most {cap} tokens in {args.data or default_data()}")
    rows = [examples[i % len(examples)] for i in range(n_steps * args.batch)]
    return rows, max(response_start(ex.tokens.labels) for ex in rows)


def prompt_of(example) -> list[int]:
    from teacherfit.distill.rollouts import response_start

    return example.tokens.input_ids[: response_start(example.tokens.labels)]


_ACCELERATOR = None


def bench_accelerator(cfg):
    """The process's one Accelerator (``launch.training_accelerator``: one process, CPU, no mixed precision)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from teacherfit.launch import training_accelerator

        _ACCELERATOR = training_accelerator(cfg.models, cfg.train)
    return _ACCELERATOR


# ---------------------------------------------------------------- the two sides


class TeacherfitOnPolicy:
    """teacherfit's side, built as ``distill.train._train`` builds it; ``step(i)`` is one iteration of its loop:
    ``OnPolicy.examples_for`` (generation included), ``collate``, ``Trainer.step``."""

    def __init__(self, args, teacher_model, student, tokenizer, examples, max_prompt: int):
        from teacherfit.distill.examples import collate
        from teacherfit.distill.rollouts import OnPolicy, build_engine
        from teacherfit.distill.teachers import OnlineTeacher
        from teacherfit.distill.train import build_trainer

        cpu = torch.device("cpu")
        cfg = bench_config(args, max_length=max_prompt + args.max_new_tokens)
        accelerator = bench_accelerator(cfg)

        def teacher_factory(_accelerator):
            return OnlineTeacher(teacher_model, vocab=None, attn_layers=None, device=cpu, student_device=cpu)

        self.trainer = build_trainer(cfg, accelerator, student, teacher_factory, vocab=None, layer_map=None,
                                     total_steps=SCHEDULE_STEPS)
        live = accelerator.unwrap_model(self.trainer.module).student
        engine = build_engine(cfg.rollout, live, tokenizer, accelerator.device, model_path=cfg.student,
                              trust_remote_code=False, max_length=cfg.train.max_length, autocast=None)
        # the engine samples with a plain generation config (the student's own is never read): exact lengths
        # go through its generation_defaults
        if not args.stop_at_eos:
            engine.generation_defaults = {"min_new_tokens": args.max_new_tokens}
        batch = args.batch
        self.on_policy = OnPolicy(cfg.kd.on_policy, cfg.rollout, engine, examples,
                                  step_indices=lambda step: [list(range(step * batch, (step + 1) * batch))],
                                  total_steps=SCHEDULE_STEPS, max_length=cfg.train.max_length, seed=cfg.train.seed,
                                  rank=accelerator.process_index)
        self.collate = collate
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.chunk = cfg.kd.chunk_for(student.get_output_embeddings().weight.shape[0])
        self.rec = {k: [] for k in ("step_s", "generate_s", "real_tokens", "generated_tokens", "positions", "kd_loss")}

    def step(self, step: int) -> None:
        start = time.perf_counter()
        batches, rollout = self.on_policy.examples_for(step)
        micros = [self.collate(b, self.pad_id) for b in batches]
        row = self.trainer.step(micros)
        self.rec["step_s"].append(time.perf_counter() - start)
        self.rec["generate_s"].append(rollout["rollout_s"])
        self.rec["real_tokens"].append(sum(int(m.attention_mask.sum()) for m in micros))
        self.rec["generated_tokens"].append(int(rollout["rollout_tokens"]))
        self.rec["positions"].append(sum(m.input_ids.numel() for m in micros))
        self.rec["kd_loss"].append(row["kd"])
        if rollout["rollout_rows"] != rollout["rows"]:
            raise RuntimeError(f"step {step}: {rollout['rollout_rows']} of {rollout['rows']} rows on-policy")

    def result(self) -> dict:
        opt = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        return {**self.rec, "head_chunk": self.chunk,
                "step": "OnPolicy.examples_for + collate + teacherfit.distill.train.Trainer.step",
                "optimizer": f"torch.optim.AdamW (fused={opt.defaults.get('fused')}, weight_decay 0)"}


def run_trl(args, teacher_model, student, tok, examples, max_prompt: int, between=None) -> dict:
    """TRL's GKDTrainer.train() with lmbda=1 on ``examples``' prompts in order; ``between(i)`` runs after its
    step i (not timed as TRL's)."""
    import datasets
    import trl
    from transformers import TrainerCallback

    from teacherfit.scoring import pad_batch

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # older TRL
        from trl import GKDConfig, GKDTrainer

    datasets.disable_progress_bars()
    n_new = args.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dataset = datasets.Dataset.from_list([{"prompt_ids": prompt_of(ex)} for ex in examples])

    def collator(features):
        # left-padded prompts for generate; input_ids / labels are replaced by training_step with the generated
        # sequences, but the Trainer counts its loss normaliser from these labels first: n_new per row
        prompts, prompt_mask = pad_batch([f["prompt_ids"] for f in features], pad, left=True)
        b = prompts.shape[0]
        return {"prompts": prompts, "prompt_attention_mask": prompt_mask,
                "input_ids": torch.cat([prompts, torch.full((b, n_new), pad)], 1),
                "attention_mask": torch.cat([prompt_mask, torch.ones(b, n_new, dtype=torch.long)], 1),
                "labels": torch.cat([torch.full_like(prompts, -100), torch.full((b, n_new), pad)], 1)}

    rec = {k: [] for k in ("step_s", "generate_s", "real_tokens", "generated_tokens", "positions", "kd_loss")}
    original = GKDTrainer.generate_on_policy_outputs  # a staticmethod: a plain function here

    def timed_generate(model, inputs, generation_config):
        start = time.perf_counter()
        ids, mask, labels = original(model, inputs, generation_config)
        rec["generate_s"].append(time.perf_counter() - start)
        rec["real_tokens"].append(int(mask.sum()))
        rec["generated_tokens"].append(int(mask[:, inputs["prompts"].shape[1]:].sum()))
        rec["positions"].append(ids.numel())
        return ids, mask, labels

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = 0.0

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, _args, state, *a, **k):
            rec["step_s"].append(time.perf_counter() - self.begin)
            if between is not None:
                between(state.global_step - 1)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                rec["kd_loss"].append(float(logs["loss"]))

    n_steps = len(examples) // args.batch
    with tempfile.TemporaryDirectory() as tmp:
        config = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=n_steps,
            lmbda=1.0, beta=0.0, temperature=args.temperature, max_new_tokens=n_new, seq_kd=False,
            max_length=max_prompt + n_new, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=config, train_dataset=dataset,
                             data_collator=collator, processing_class=tok, callbacks=[Clock()])
        match_sampling(trainer.generation_config, args)  # min_new_tokens (TRL already has top_k=0)
        trainer.generation_kwargs.update(min_new_tokens=trainer.generation_config.min_new_tokens)
        trainer.generate_on_policy_outputs = timed_generate  # looked up on the instance by training_step
        gen = trainer.generation_config
        trainer.train()
    return {**rec, "trl_version": trl.__version__, "optimizer": str(config.optim),
            "trainer": f"{GKDTrainer.__module__}.GKDTrainer",
            "generation": {k: getattr(gen, k) for k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens",
                                                         "min_new_tokens", "use_cache", "eos_token_id")}}


# ---------------------------------------------------------------- children


def child_speed(args) -> dict:
    """TRL and teacherfit in one process, alternating step by step on the same prompts."""
    teacher_model, tok = load_teacher(args)
    examples, max_prompt = prompt_examples(args, tok, args.warmup + args.steps)
    ours = TeacherfitOnPolicy(args, teacher_model, load_student(args, tok), tok, examples, max_prompt)
    trl_result = run_trl(args, teacher_model, load_student(args, tok), tok, examples, max_prompt, between=ours.step)
    return {"trl": trl_result, "teacherfit": ours.result(), "max_prompt": max_prompt}


def child_teacherfit(args) -> dict:
    teacher_model, tok = load_teacher(args)
    student = load_student(args, tok)
    examples, max_prompt = prompt_examples(args, tok, args.warmup + args.mem_steps)
    bench_accelerator(bench_config(args, max_prompt + args.max_new_tokens))  # before the baseline
    with PeakRSS() as mem:
        ours = TeacherfitOnPolicy(args, teacher_model, student, tok, examples, max_prompt)
        for step in range(args.warmup + args.mem_steps):
            ours.step(step)
    return {**ours.result(), **mem.result()}


def child_trl(args) -> dict:
    import datasets  # noqa: F401  (imported before the baseline, like everything the run needs)
    import trl  # noqa: F401

    teacher_model, tok = load_teacher(args)
    student = load_student(args, tok)
    examples, max_prompt = prompt_examples(args, tok, args.warmup + args.mem_steps)
    with PeakRSS() as mem:
        result = run_trl(args, teacher_model, student, tok, examples, max_prompt)
    return {**result, **mem.result()}


def run_child(args) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = {"speed": child_speed, "teacherfit": child_teacherfit, "trl": child_trl}[args.only](args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def spawn(args, only: str) -> dict:
    """Run one measurement in a fresh process; {"error": ...} if it failed."""
    forward = ["--teacher", args.teacher, "--student-layers", args.student_layers, "--batch", str(args.batch),
               "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--mem-steps", str(args.mem_steps),
               "--lr", str(args.lr), "--buffer-steps", str(args.buffer_steps)]
    for flag, value in (("--data", args.data), ("--prompt-len", args.prompt_len), ("--head-chunk", args.head_chunk)):
        if value is not None:
            forward += [flag, str(value)]
    forward += [flag for flag, on in (("--stop-at-eos", args.stop_at_eos), ("--tiny", args.tiny)) if on]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", only, *forward]
    return measure_in_child(cmd, args.timeout)


def summarise(r: dict, w: int) -> dict:
    """The measured steps' figures of one side."""
    steps, gen = r["step_s"][w:], r["generate_s"][w:]
    real, new = r["real_tokens"][w:], r["generated_tokens"][w:]
    return {"median_step_s": statistics.median(steps), "mean_step_s": sum(steps) / len(steps),
            "tok_s": sum(real) / sum(steps), "step_tok_s": [t / s for t, s in zip(real, steps)],
            "generate_share": sum(gen) / sum(steps), "generate_tok_s": sum(new) / sum(gen),
            "real_per_step": sum(real) / len(real), "generated_per_step": sum(new) / len(new),
            "positions_per_step": sum(r["positions"][w:]) / len(steps)}


def report(args, out: dict) -> None:
    print(f"\nteacherfit vs TRL GKD, on-policy (lmbda=1 / kd.on_policy=1): batch {args.batch}, "
          f"{args.max_new_tokens} new tokens per prompt{' (or to a stop token)' if args.stop_at_eos else ' (forced)'}, "
          f"temperature {args.temperature}, forward KL (beta=0), tau 1 ({load_line()})")
    speed = spawn(args, "speed")
    mem = {} if args.no_memory else {"teacherfit": spawn(args, "teacherfit"), "trl": spawn(args, "trl")}
    out["speed"], out["memory"] = speed, mem
    if "error" in speed:
        print(f"  speed run FAILED: {speed['error']}")
        return
    w = args.warmup
    sides = {"teacherfit": summarise(speed["teacherfit"], w), "trl": summarise(speed["trl"], w)}
    paired = statistics.median(a / b for a, b in zip(sides["teacherfit"]["step_tok_s"], sides["trl"]["step_tok_s"]))
    total = sides["teacherfit"]["tok_s"] / sides["trl"]["tok_s"]
    rows = []
    for name, s in sides.items():
        r = speed[name]
        rows.append({"trainer": name, "median s/step": f"{s['median_step_s']:.2f}", "mean s/step": f"{s['mean_step_s']:.2f}",
                     "real tok/s": s["tok_s"], "generate share": f"{s['generate_share']:.0%}",
                     "generate tok/s": s["generate_tok_s"],
                     "tokens/step (real / generated / padded)":
                         f"{s['real_per_step']:.0f} / {s['generated_per_step']:.0f} / {s['positions_per_step']:.0f}",
                     "vs TRL tok/s (median of per-step ratios)": "" if name == "trl" else f"{paired:.2f}x",
                     "vs TRL (total time)": "" if name == "trl" else f"{total:.2f}x",
                     "KD loss step 1": f"{r['kd_loss'][0]:.4f}", "KD loss last": f"{r['kd_loss'][-1]:.4f}"})
    show(rows, ["trainer", "median s/step", "mean s/step", "real tok/s", "generate share", "generate tok/s",
                "tokens/step (real / generated / padded)", "vs TRL tok/s (median of per-step ratios)",
                "vs TRL (total time)", "KD loss step 1", "KD loss last"], args,
         f"speed: one process, the trainers alternating step by step on the same prompts; {w} warm-up + "
         f"{args.steps} measured steps; real tokens = prompts + generated (no pads); generate share = time in "
         "generate / step time (KD loss: each side's own samples, so close, not equal):")

    rows = []
    for name, r in mem.items():
        if "error" in r:
            rows.append({"trainer": name, "peak RSS": "FAILED: " + r["error"].splitlines()[-1][:100]})
            continue
        ratio = "" if name == "trl" or "error" in mem["trl"] else f"{r['increment_mib'] / mem['trl']['increment_mib']:.2f}x"
        rows.append({"trainer": name, "peak RSS": fmt_mib(r["peak_mib"]), "after load": fmt_mib(r["base_mib"]),
                     "increment": fmt_mib(r["increment_mib"]), "increment vs TRL": ratio})
    show(rows, ["trainer", "peak RSS", "after load", "increment", "increment vs TRL"], args,
         f"peak memory: each trainer alone in a fresh process, {w} + {args.mem_steps} steps; increment = peak RSS "
         "minus RSS after loading teacher and student:")

    ratios = {"speed_median_paired": paired, "speed_total": total,
              "generate_share": {k: v["generate_share"] for k, v in sides.items()}}
    # with a generation buffer only every buffer_steps-th step generates: per-step ratios swing, the total time is
    # the fair comparison (measure whole buffers: --warmup and --steps multiples of --buffer-steps)
    ratio, how = (paired, "median of per-step ratios") if args.buffer_steps == 1 else (total, "total time")
    verdict = (f"tokens/s {ratio:.2f}x, {how} (target >= {SPEED_TARGET}x: "
               f"{'met' if ratio >= SPEED_TARGET else 'MISSED'})")
    if mem and "error" not in mem["teacherfit"] and "error" not in mem["trl"]:
        m = mem["teacherfit"]["increment_mib"] / max(mem["trl"]["increment_mib"], 1)
        ratios.update(memory_increment=m, memory_absolute=mem["teacherfit"]["peak_mib"] / mem["trl"]["peak_mib"])
        verdict += (f"; peak-memory increment {m:.2f}x (target <= {MEMORY_TARGET}x: "
                    f"{'met' if m <= MEMORY_TARGET else 'MISSED'}), absolute peak {ratios['memory_absolute']:.2f}x")
    out["ratios"] = ratios
    print(f"teacherfit / TRL: {verdict}")
    trl = speed["trl"]
    print(f"TRL {trl.get('trl_version')} ({trl.get('trainer')}, optimizer {trl.get('optimizer')}, generation "
          f"{trl.get('generation')}); teacherfit head_chunk {speed['teacherfit'].get('head_chunk')}, optimizer "
          f"{speed['teacherfit'].get('optimizer')}; longest prompt {speed['max_prompt']} tokens")


def main() -> None:
    args = parse_args()
    if args.only:
        run_child(args)
        return
    out: dict = {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()}}
    models = ("tiny random Llama models (2 layers -> 1), " if args.tiny else "") + f"teacher {args.teacher}"
    print(f"{models}, student = its {args.student_layers} layers; fp32, CPU, no bf16, no gradient checkpointing; "
          f"prompts of {(args.data or default_data()).name}")
    print(f"machine: {machine_line()}")
    out["load_before"] = load_line()
    print(f"before: {out['load_before']}")
    started = time.perf_counter()
    report(args, out)
    out["load_after"] = load_line()
    out["seconds"] = time.perf_counter() - started
    print(f"\nafter: {out['load_after']}; total {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
