"""The distillation engine on tiny real models: values, normalisation, resume, refusals."""

import json
import math
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.config import DistillConfig, TrainOptions, load_config
from teacherfit.data import Record, write_records
from teacherfit.distill.compat import KDIncompatible, check_kd_compatibility
from teacherfit.distill.examples import tokenize_records, training_records
from teacherfit.distill.examples import collate
from teacherfit.distill.train import Schedule
from procs import killed_and_resumed, write_config
from tiny import save_tiny, tiny_llama, tiny_tokenizer

runner = CliRunner()

QA = [("Write a short poem about the sea.", "The sea is blue and wide, the sky is grey."),
      ("List three colours.", "red, green and blue"),
      ("What is the capital of France?", "Paris is the capital of France."),
      ("Explain how a neural network learns.", "It computes a loss, then gradients, then updates."),
      ("def add(a, b):", "    return a + b"),
      ("Translate good morning into French.", "bonjour"),
      ("Say hello.", "Hello! How can I help?"),
      ("Name a fox.", "The quick brown fox.")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("distill")
    teacher = save_tiny(tiny_llama(tokenizer, seed=21, layers=4), tokenizer, root / "teacher")
    student = save_tiny(tiny_llama(tokenizer, seed=22, layers=2), tokenizer, root / "student")
    recs = [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    data = write_records(root / "train.jsonl", recs)
    return root, teacher, student, data


def _cfg(ws, out, *extra):
    root, teacher, student, data = ws
    return load_config(DistillConfig, None, [
        f"student={student}", f"teacher={teacher}", f"data.responses=[{{name: t, path: {data}}}]",
        "train.batch_size=2", "train.grad_accum=2", "train.max_steps=4", "train.warmup_steps=1",
        "train.lr=1e-3", "train.checkpoint_every=2", "models.device=cpu", f"out={out}", *extra])


def naive_step_loss(cfg, student, teacher, micros, layer_map):
    """(1-l) CE + l (w_pred KL_fwd + w_attn L_attn) over the whole step, from full logits and eager maps."""
    ce_sum = kd_sum = 0.0
    n_tok = 0
    attn_terms, n_q = [], 0
    for m in micros:
        with torch.no_grad():
            s = student(m.input_ids, attention_mask=m.attention_mask, output_attentions=True)
            t = teacher(m.input_ids, attention_mask=m.attention_mask, output_attentions=True)
        for b in range(m.input_ids.shape[0]):
            for pos in range(m.input_ids.shape[1] - 1):
                y = int(m.labels[b, pos + 1])
                if y == -100:
                    continue
                ls = F.log_softmax(s.logits[b, pos].double(), -1)
                lt = F.log_softmax(t.logits[b, pos].double(), -1)
                ce_sum += -float(ls[y])
                kd_sum += float((lt.exp() * (lt - ls)).sum())
                n_tok += 1
            for pos in range(m.input_ids.shape[1]):
                if int(m.labels[b, pos]) == -100:
                    continue
                n_q += 1
                for sl, tl in layer_map.items():
                    a_s = s.attentions[sl][b, :, pos, : pos + 1].double()
                    a_t = t.attentions[tl][b, :, pos, : pos + 1].double()
                    # same head count here: one-to-one heads, mean over layers and heads
                    attn_terms.append(float((a_t * (a_t.clamp_min(1e-30).log() - a_s.clamp_min(1e-10).log())).sum(-1).mean()))
    lam, kd = cfg.kd.lambda_, cfg.kd
    attn = sum(attn_terms) / len(attn_terms)
    return (1 - lam) * ce_sum / n_tok + lam * (kd.w_pred * kd_sum / n_tok + kd.w_attn * attn), ce_sum / n_tok


def test_first_step_loss_matches_naive_reference(ws, tokenizer, tmp_path):
    from teacherfit.pipelines.distill import run_distill

    cfg = _cfg(ws, tmp_path / "run", "kd.lambda=0.7", "kd.w_attn=0.5", "train.max_steps=1")
    root, teacher_dir, student_dir, _ = ws
    recs = training_records(cfg.data)
    examples, _ = tokenize_records(recs, tokenizer, cfg.train.max_length)
    micros = [collate([examples[i] for i in idx], tokenizer.pad_token_id)
              for idx in Schedule(len(examples), cfg.train).step(0)]
    student = AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="eager").eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    expected, expected_ce = naive_step_loss(cfg, student, teacher, micros, {0: 1, 1: 3})  # uniform map 2 -> 4
    summary = run_distill(cfg)
    first = summary["final"]
    assert summary["layer_map"] == {"0": 1, "1": 3}
    assert first["ce"] == pytest.approx(expected_ce, rel=1e-5)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_grad_accumulation_is_normalised_by_real_tokens(ws, tmp_path):
    """One step of 4 examples: one micro-batch of 4 and two of 2 give the same update."""
    from teacherfit.pipelines.distill import run_distill

    a = run_distill(_cfg(ws, tmp_path / "a", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=1"))
    b = run_distill(_cfg(ws, tmp_path / "b", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=1"))
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-6)
    ma = AutoModelForCausalLM.from_pretrained(a["model_dir"])
    mb = AutoModelForCausalLM.from_pretrained(b["model_dir"])
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_cli_distill_half_depth_student_end_to_end(ws, tmp_path):
    root, teacher, _, data = ws
    out = tmp_path / "half"
    result = runner.invoke(app, ["distill", "--student", str(teacher), "--teacher", str(teacher),
                                 "--responses", f"t={data}", "--out", str(out),
                                 "--set", "student_init={layers: every_other}", "--set", "train.max_steps=3",
                                 "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
                                 "--set", "models.device=cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["kd"] >= 0 and r["attn"] >= 0 for r in log)
    # a half-depth copy of the teacher starts close to it: small but non-zero KD
    assert 0 < log[0]["kd"] < 5
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2
    assert (out / "model" / "model.safetensors").exists()
    html = (out / "report.html").read_text()
    assert 'alt="loss curves"' in html and "data:image/png;base64," in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer_map"] == {"0": 1, "1": 3} and summary["student_layers"] == 2


def test_mismatched_tokenizer_is_refused_before_loading_the_teacher(ws, tmp_path):
    root, teacher, student, data = ws
    other_tok = tiny_tokenizer(vocab_size=300)
    other = save_tiny(tiny_llama(other_tok, seed=3), other_tok, tmp_path / "other")
    os.remove(other / "model.safetensors")  # its weights are never read
    result = runner.invoke(app, ["distill", "--student", str(student), "--teacher", str(other),
                                 "--responses", f"t={data}", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "same tokenizer" in text and "sequence-level KD" in text


def test_padded_vocabulary_rows_are_allowed(tokenizer):
    compat = check_kd_compatibility(tokenizer, tokenizer, student_rows=len(tokenizer), teacher_rows=len(tokenizer) + 64)
    assert compat.vocab == len(tokenizer) and "padded rows" in compat.notes[0]
    with pytest.raises(KDIncompatible, match="fewer rows"):
        check_kd_compatibility(tokenizer, tokenizer, student_rows=len(tokenizer) - 1, teacher_rows=len(tokenizer))


def test_nan_loss_stops_with_step_and_term(ws, tmp_path, tokenizer):
    root, teacher_dir, student_dir, data = ws
    bad = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        bad.lm_head.weight[0, 0] = float("nan")
    bad_dir = save_tiny(bad, tokenizer, tmp_path / "nan-teacher")
    result = runner.invoke(app, ["distill", "--student", str(student_dir), "--teacher", str(bad_dir),
                                 "--responses", f"t={data}", "--out", str(tmp_path / "nan"),
                                 "--set", "train.max_steps=2", "--set", "train.batch_size=2"])
    assert result.exit_code == 2
    assert "non-finite kd loss at step 1" in " ".join(result.output.split())


def test_sequence_level_kd_needs_no_teacher(ws, tmp_path):
    from teacherfit.pipelines.distill import run_distill

    root, _, student, data = ws
    cfg = load_config(DistillConfig, None, [f"student={student}", f"data.responses=[{{name: t, path: {data}}}]",
                                            "kd.lambda=0", "train.max_steps=2", "train.batch_size=2",
                                            f"out={tmp_path / 'sft'}"])
    summary = run_distill(cfg)
    assert summary["final"]["kd"] == 0 and summary["final"]["ce"] > 0 and summary["teacher"] is None


def test_lora_student_saves_merged_and_adapter_alone_with_a_model_card(ws, tmp_path):
    """The merged model and the adapter alone (peft) give the same logits; the card says what was trained how."""
    from peft import PeftModel

    from teacherfit.pipelines.distill import run_distill

    root, teacher, student, data = ws
    summary = run_distill(_cfg(ws, tmp_path / "lora", "lora={r: 4, alpha: 8}", "train.max_steps=2"))
    model_dir = Path(summary["model_dir"])
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter_dir = model_dir.parent / "model-adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    assert not (adapter_dir / "model.safetensors").exists()  # the adapter alone, not a second full model
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), adapter_dir).eval()
    ids = torch.tensor([[1, 7, 11, 15, 19]])
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(student).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-6  # the adapters were trained
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "teacherfit" in card
    for text in (f"| base model | `{student}` |", f"| teacher | `{teacher}` |", str(data), "| optimizer steps | 2 |",
                 '"ce": 0.0, "pred": 1.0', "forward_kl, temperature 1.0", '"r": 4', "| adapter only | model-adapter |",
                 "| saved dtype | float32 |"):
        assert text in card, text
    assert f"loss {summary['final']['loss']:.4f}" in card


def test_saved_model_dtype_and_a_base_students_chat_template(ws, tmp_path, base_tokenizer):
    """save_dtype=bfloat16 writes bf16 weights; a student without a chat template is saved with the plain
    template it was trained with, so apply_chat_template renders what training rendered."""
    from teacherfit.data import PLAIN_CHAT_TEMPLATE
    from teacherfit.pipelines.distill import run_distill

    root, teacher, student, data = ws
    base_student = save_tiny(tiny_llama(base_tokenizer, seed=22, layers=2), base_tokenizer, tmp_path / "base")
    summary = run_distill(_cfg(ws, tmp_path / "bf16", f"student={base_student}", "kd.lambda=0",
                               "train.max_steps=1", "train.save_dtype=bfloat16"))
    model_dir = Path(summary["model_dir"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(model_dir)
    assert saved.chat_template == PLAIN_CHAT_TEMPLATE
    assert "plain template" in (model_dir / "README.md").read_text()


def test_killed_run_resumes_with_the_same_loss_curve(ws, tmp_path):
    root, teacher, student, data = ws

    def write(out, steps=12):
        cfg = {"student": str(student), "teacher": str(teacher),
               "data": {"responses": [{"name": "t", "path": str(data)}]},
               "kd": {"lambda": 0.8}, "models": {"device": "cpu"},
               "train": {"batch_size": 2, "grad_accum": 1, "max_steps": steps, "warmup_steps": 2, "lr": 1e-3,
                         "checkpoint_every": 3, "keep_checkpoints": 2},
               "out": str(out)}
        return write_config(tmp_path, out.name, cfg)

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    a, b = killed_and_resumed("distill", (write(ref), ref), (write(killed), killed))
    assert [r["step"] for r in b] == list(range(1, 13))  # no duplicates, no gaps
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "attn", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_a_resume_under_another_batch_layout_is_refused(ws, tmp_path):
    """The checkpoint records which batches its steps held; resuming with another batch size (or process count,
    accumulation, example set, seed) would skip or repeat examples, and is refused naming what changed."""
    from teacherfit.pipelines.distill import run_distill

    out = tmp_path / "layout"
    run_distill(_cfg(ws, out, "train.max_steps=2", "train.checkpoint_every=1"))
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state == {"step": 2, "processes": 1, "batch_size": 2, "grad_accum": 2, "examples": len(QA), "seed": 0,
                     "on_policy": 0.0, "buffer_steps": None}
    with pytest.raises(ValueError, match="another batch layout \\(batch_size 2 -> 1\\)"):
        run_distill(_cfg(ws, out, "train.max_steps=4", "train.batch_size=1"))


def test_two_process_ddp_matches_one_process_with_accumulation(ws, tmp_path):
    """Two CPU processes (gloo): the same global batch per step gives the same losses and model."""
    root, teacher, student, data = ws

    def write(name, grad_accum):
        cfg = {"student": str(student), "teacher": str(teacher),
               "data": {"responses": [{"name": "t", "path": str(data)}]}, "models": {"device": "cpu"},
               "kd": {"lambda": 0.6, "w_attn": 0.5},
               "train": {"batch_size": 2, "grad_accum": grad_accum, "max_steps": 2, "warmup_steps": 1, "lr": 1e-3},
               "out": str(tmp_path / name)}
        return write_config(tmp_path, name, cfg)

    single = subprocess.run([sys.executable, "-m", "teacherfit", "distill", "-c", str(write("single", 2))],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    # torchrun sets the process-group environment; accelerate picks it up (gloo on CPU: MULTI_CPU)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29547", "-m", "teacherfit", "distill", "-c", str(write("ddp", 1))],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a = [json.loads(l) for l in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        # grad_norm is the global gradient's norm: equal norms mean the DDP average equals the accumulated sum.
        # (Parameters are not compared: Adam's first steps move by ~lr * sign(g), so gradients within
        # float rounding of 0 can flip an update either way.)
        for key in ("loss", "ce", "kd", "attn", "grad_norm", "tokens"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key


def test_distill_from_the_teacher_cache_equals_the_online_teacher(ws, tmp_path, tokenizer):
    """With K covering the vocabulary the cached distribution is the teacher's: same first-step losses."""
    from teacherfit.config import CacheTeacherConfig
    from teacherfit.pipelines.cache_teacher import run_cache_teacher
    from teacherfit.pipelines.distill import run_distill

    root, teacher, student, data = ws
    cache_cfg = load_config(CacheTeacherConfig, None, [f"teacher={teacher}", f"data.responses=[{{name: t, path: {data}}}]",
                                                      f"top_k={len(tokenizer)}", f"out={tmp_path / 'cache'}"])
    run_cache_teacher(cache_cfg)
    online = run_distill(_cfg(ws, tmp_path / "online", "kd.w_attn=0", "train.max_steps=1"))
    cached = run_distill(_cfg(ws, tmp_path / "cached", "kd.w_attn=0", "train.max_steps=1", "teacher=null",
                              f"teacher_cache={tmp_path / 'cache'}"))
    assert cached["final"]["kd"] == pytest.approx(online["final"]["kd"], rel=1e-4)
    assert cached["final"]["ce"] == pytest.approx(online["final"]["ce"], rel=1e-6)


def test_attention_kd_with_a_cache_is_refused(ws, tmp_path):
    from teacherfit.pipelines.distill import run_distill

    with pytest.raises(ValueError, match="attention KD needs the online teacher"):
        run_distill(_cfg(ws, tmp_path / "x", "teacher=null", f"teacher_cache={tmp_path}"))


def test_gradient_checkpointing_gives_the_same_run(ws, tmp_path):
    """train.gradient_checkpointing recomputes the student's activations: same losses and weights, to fp32 noise."""
    from teacherfit.pipelines.distill import run_distill

    base = ("kd.w_attn=0", "train.max_steps=2")
    a = run_distill(_cfg(ws, tmp_path / "a", *base))
    b = run_distill(_cfg(ws, tmp_path / "b", *base, "train.gradient_checkpointing=true"))
    for key in ("first", "final"):
        assert b[key]["loss"] == pytest.approx(a[key]["loss"], rel=1e-6)
        assert b[key]["grad_norm"] == pytest.approx(a[key]["grad_norm"], rel=1e-5)
    ma = AutoModelForCausalLM.from_pretrained(a["model_dir"])
    mb = AutoModelForCausalLM.from_pretrained(b["model_dir"])
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    with pytest.raises(ValueError, match="attention KD"):
        run_distill(_cfg(ws, tmp_path / "c", "train.gradient_checkpointing=true"))


@pytest.mark.parametrize("n,batch,accum,world,epochs", [(10, 2, 4, 1, 2), (11, 2, 4, 1, 3), (12, 2, 2, 2, 2),
                                                        (7, 3, 1, 1, 1), (16, 2, 4, 1, 2)])
def test_epochs_see_every_example_exactly_epochs_times(n, batch, accum, world, epochs):
    """10 examples, batch 2 x grad_accum 4, 2 epochs: 4 steps of 4 + 1 micro-batches, 20 examples, no step
    mixing two epochs (it used to be 3 steps of 4 micro-batches, 2.4 epochs)."""
    opts = TrainOptions(batch_size=batch, grad_accum=accum, epochs=epochs)
    ranks = [Schedule(n, opts, world, rank) for rank in range(world)]
    seen = []
    for step in range(ranks[0].total_steps):
        micro = [m for s in ranks for m in s.step(step)]
        assert micro and all(s.step(step) for s in ranks)  # every process has work in every step
        assert len(micro) <= accum * world and all(1 <= len(m) <= batch for m in micro)
        # one epoch per step: a step's examples are distinct
        flat = [i for m in micro for i in m]
        assert len(flat) == len(set(flat))
        seen += flat
    assert len(seen) == epochs * n and all(seen.count(i) == epochs for i in range(n))


@pytest.mark.parametrize("n,batch,accum,world", [(2, 2, 1, 2), (5, 2, 1, 4), (3, 1, 1, 4)])
def test_too_few_micro_batches_for_the_processes_is_refused_not_a_hang(n, batch, accum, world):
    """A process with no micro-batch in a step would wait forever in DDP's gradient sync."""
    with pytest.raises(ValueError, match=f"too few for {world} processes"):
        Schedule(n, TrainOptions(batch_size=batch, grad_accum=accum), world, 0)


def test_several_processes_drop_only_an_epochs_last_micro_batches_that_cannot_be_shared():
    """2 processes x grad_accum 2 = 4 micro-batches a step; every process must run as many micro-batches as the
    others in every step (FSDP2 / ZeRO-3 gather weights in each forward). 7 micro-batches: the last step's 3
    become 2 (1 + 1). 5: the 5th alone is left out. 6: all seen (last step 1 + 1). 3 processes, 8: last step 2
    of 6 per step would be 1 + 1 + 0: both left out."""
    for world, n, expected in ((2, 7, 6), (2, 5, 4), (2, 6, 6), (3, 8, 6)):
        opts = TrainOptions(batch_size=1, grad_accum=2, epochs=1)
        ranks = [Schedule(n, opts, world, r) for r in range(world)]
        steps = range(ranks[0].total_steps)
        seen = [i for step in steps for s in ranks for m in s.step(step) for i in m]
        for step in steps:
            assert len({len(s.step(step)) for s in ranks}) == 1 and ranks[0].step(step)  # same count, never 0
        assert len(seen) == expected and len(set(seen)) == expected


def test_dry_run_checks_everything_and_loads_nothing(ws, tmp_path, monkeypatch):
    import teacherfit.pipelines.distill as pipeline
    import teacherfit.pipelines.recipe as recipe

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run must not load weights")

    monkeypatch.setattr(recipe, "load_model", no_weights)
    out = tmp_path / "dry"
    plan = pipeline.run_distill(_cfg(ws, out, "kd.w_attn=0.5", "train.max_steps=null", "train.epochs=2"),
                                dry_run=True)
    # 8 examples at batch 2 x grad_accum 2: 2 steps an epoch
    assert plan["dry_run"] and plan["examples"]["examples"] == len(QA)
    assert plan["steps"] == 4 and plan["steps_per_epoch"] == 2 and plan["layer_map"] == {"0": 1, "1": 3}
    assert not out.exists()  # no run directory, model or checkpoint
    with pytest.raises(ValueError, match="student_init.layers"):
        pipeline.run_distill(_cfg(ws, out, "student_init={layers: 'first:9'}"), dry_run=True)
    with pytest.raises(ValueError, match="layer map"):
        pipeline.run_distill(_cfg(ws, out, "kd.w_attn=0.5", "kd.layer_map='last:5'"), dry_run=True)
    root, teacher, student, data = ws
    other = tiny_tokenizer(vocab_size=300)
    other_dir = save_tiny(tiny_llama(other, seed=3), other, tmp_path / "other")
    with pytest.raises(KDIncompatible, match="same tokenizer"):
        pipeline.run_distill(_cfg(ws, out, f"teacher={other_dir}"), dry_run=True)
    assert not out.exists()


def test_report_to_tensorboard_logs_the_same_numbers_as_the_jsonl_log(ws, tmp_path):
    """train.report_to goes through accelerate's trackers: TensorBoard's event file holds every logged step's
    numbers, equal to log.jsonl's, and the run's config as hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from teacherfit.pipelines.distill import run_distill

    summary = run_distill(_cfg(ws, tmp_path / "tb", "train.report_to=tensorboard", "kd.w_attn=0"))
    log = [json.loads(line) for line in (tmp_path / "tb" / "log.jsonl").read_text().splitlines()]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run directory"
    scalars = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in log] == [1, 2, 3, 4]
    for key in ("loss", "ce", "kd", "lr", "grad_norm"):
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-6)
    assert summary["steps"] == 4


def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_any_work(ws, tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from teacherfit.cli import app

    missing = next(n for n in ("wandb", "swanlab", "aim", "dvclive") if importlib.util.find_spec(n) is None)
    root, teacher, student, data = ws
    result = CliRunner().invoke(app, ["distill", "--student", str(student), "--teacher", str(teacher),
                                      "--responses", f"t={data}", "--out", str(tmp_path / "run"),
                                      "--set", f"train.report_to=[{missing}]"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: invalid config (defaults): field `train.report_to`: Value error, "
                                     f"{missing} is not installed: `pip install {missing}`, or leave it out of "
                                     f"train.report_to (got ['{missing}'])")
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["distill", "--student", str(student), "--teacher", str(teacher),
                                      "--responses", f"t={data}", "--set", "train.report_to=tensorbord"])
    assert result.exit_code == 2 and "did you mean 'tensorboard'" in result.output
