"""On-policy distillation with a teacher behind a real llama.cpp server (llama-cpp-python, packaged GGUFs on
loopback): its log-probabilities against the same model in transformers, the tokenizer check, and short runs
with the server as the teacher and as the rollout engine."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.config import DistillConfig, ServerTeacherConfig, load_config
from teacherfit.data import Record, write_records
from teacherfit.distill.examples import collate, tokenize_records
from teacherfit.distill.teachers import ServerTeacher
from teacherfit.models import load_model, packaged_gguf_path

pytestmark = [pytest.mark.server, pytest.mark.slow]

STUDENT = "smollm2-135m-instruct"
QA = [("Name a fruit.", "An apple is a fruit."),
      ("What is the capital of France?", "Paris is the capital of France."),
      ("Say hello.", "Hello! How can I help?"),
      ("def add(a, b):", "    return a + b")]  # leading spaces: llama.cpp's pre-tokenizer spells them otherwise

# Measured on these 4 rows (Q4_1 GGUF served by llama-cpp-python 0.3.36 vs its dequantised weights in
# transformers, fp32): mean |diff| 0.07 nats, max 0.45 nats over the scored response tokens.
MEAN_TOL, MAX_TOL = 0.15, 1.0


@pytest.fixture(scope="module")
def smollm2():
    return load_model(STUDENT, device="cpu", dtype="float32")


def _records():
    return [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]


def test_llama_cpp_teacher_log_probs_agree_with_the_model_in_transformers(llama_server, smollm2):
    tok = smollm2.tokenizer
    examples, _ = tokenize_records(_records(), tok, 256)
    micro = collate(examples, tok.pad_token_id)
    cfg = ServerTeacherConfig(remote={"base_url": llama_server, "model": "smollm2", "concurrency": 2},
                              server="llama_cpp")
    teacher = ServerTeacher(cfg, tok, mode="sampled", student_device=torch.device("cpu"))
    got = teacher.head_signal(micro).sampled
    with torch.no_grad():
        logp = smollm2.model(micro.input_ids, attention_mask=micro.attention_mask).logits.log_softmax(-1)
    ref = logp[:, :-1].gather(-1, micro.input_ids[:, 1:, None]).squeeze(-1)
    scored = (micro.labels[:, 1:] != -100) & ~got.isnan()
    diff = (got - ref)[scored].abs()
    assert int(scored.sum()) >= 20
    assert float(diff.mean()) < MEAN_TOL and float(diff.max()) < MAX_TOL, (float(diff.mean()), float(diff.max()))
    # the same tokens one position off (a misaligned reading) would be far away: the check can fail
    shifted = (got[:, 1:] - ref[:, :-1])[scored[:, 1:] & scored[:, :-1]].abs()
    assert float(shifted.mean()) > 5 * MEAN_TOL
    # the 4-space row: the server tokenizes its text otherwise, so its tokens from the first difference on are
    # not scored (NaN, counted), and only those
    code = 3  # the rows are in QA's order
    unscored = (micro.labels[:, 1:] != -100) & got.isnan()
    assert unscored[code].any() and not unscored[[i for i in range(len(QA)) if i != code]].any()
    assert teacher.stats["unscored_tokens"] == int(unscored.sum())


def test_a_server_teacher_with_another_tokenizer_is_refused_before_training(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed")
    from servers import llama_cpp_server

    data = write_records(tmp_path / "train.jsonl", _records())
    with llama_cpp_server(packaged_gguf_path("gemma-3-270m"), model_alias="gemma") as url:
        result = CliRunner().invoke(app, ["distill", *sum((["--set", s] for s in [
            f"student={STUDENT}", f"teacher={{backend: openai, server: llama_cpp, remote: {{base_url: '{url}', "
            "model: gemma}}", f"data.responses=[{{name: t, path: {data}}}]", "kd.on_policy=1", "kd.w_attn=0",
            "kd.divergence=sampled_reverse_kl", f"out={tmp_path / 'run'}"]), [])])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "tokenizes the student's text differently" in text and "share the student's tokenizer" in text
    assert "Traceback" not in result.output and not (tmp_path / "run" / "checkpoints").exists()


def _cfg(tmp_path, data, out, *extra):
    return load_config(DistillConfig, None, [
        f"student={STUDENT}", "student_init.layers=first:6", f"data.responses=[{{name: t, path: {data}}}]",
        "kd.on_policy=1", "kd.w_attn=0", "kd.divergence=sampled_reverse_kl", "rollout.max_new_tokens=8",
        "train.batch_size=2", "train.grad_accum=1", "train.max_steps=1", "train.warmup_steps=0", "train.lr=1e-4",
        "models.device=cpu", f"out={tmp_path / out}", *extra])


def test_on_policy_runs_with_the_server_as_teacher_and_as_rollout_engine(llama_server, smollm2, tmp_path):
    """Greedy rollouts of a 6-layer student cut from SmolLM2, scored by SmolLM2 in process and behind the server:
    each run's kd is the naive sum of its teacher's per-token log-ratios (the server's tokens it could not score
    count 0 and are logged), and the two teachers agree per token to the quantisation's tolerance. Then the
    server also samples the rollouts (rollout.engine openai)."""
    from teacherfit.distill.examples import training_records
    from teacherfit.pipelines.distill import run_distill
    from teacherfit.pipelines.recipe import build_student
    from test_on_policy import naive_greedy

    data = write_records(tmp_path / "train.jsonl", _records()[:2])
    server_teacher = (f"teacher={{backend: openai, server: llama_cpp, remote: {{base_url: '{llama_server}', "
                      "model: smollm2}}")
    cfg = _cfg(tmp_path, data, "local", f"teacher={STUDENT}", "rollout.temperature=0")
    # the reference: the same rollouts by full forward passes, both teachers' log-ratios per token
    tok = smollm2.tokenizer
    student = build_student(cfg)[0].eval()
    examples, _ = tokenize_records(training_records(cfg.data), tok, 256)
    for e in examples:
        first = next(t for t, y in enumerate(e.tokens.labels) if y != -100)
        prompt = e.tokens.input_ids[:first]
        gen = naive_greedy(student, prompt, tok.eos_token_id, 8)
        e.tokens.input_ids, e.tokens.labels = prompt + gen, [-100] * len(prompt) + gen
    micro = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        ls = student(micro.input_ids, attention_mask=micro.attention_mask).logits.log_softmax(-1)
        lt = smollm2.model(micro.input_ids, attention_mask=micro.attention_mask).logits.log_softmax(-1)
    y, loss = micro.input_ids[:, 1:, None], micro.labels[:, 1:] != -100
    s_y, t_y = ls[:, :-1].gather(-1, y).squeeze(-1), lt[:, :-1].gather(-1, y).squeeze(-1)
    served_t = ServerTeacher(ServerTeacherConfig(remote={"base_url": llama_server, "model": "smollm2"},
                                                 server="llama_cpp"), tok, mode="sampled",
                             student_device=torch.device("cpu")).head_signal(micro).sampled
    scored = loss & ~served_t.isnan()
    assert float((served_t - t_y)[scored].abs().max()) < MAX_TOL

    local = run_distill(cfg)["first"]
    served = run_distill(_cfg(tmp_path, data, "served", server_teacher, "rollout.temperature=0"))["first"]
    n = int(loss.sum())
    assert served["tokens"] == local["tokens"] == n == 16
    assert local["kd"] == pytest.approx(float((s_y - t_y)[loss].sum()) / n, rel=1e-4)
    assert served["kd"] == pytest.approx(float((s_y - served_t)[scored].sum()) / n, rel=1e-4)
    assert served["unscored_tokens"] == int((loss & served_t.isnan()).sum()) <= 4
    assert local["kd"] > 1.0  # the 6-layer student is far from its teacher: a real signal, not noise

    remote = f"rollout.remote={{base_url: '{llama_server}', model: smollm2}}"
    rolled = run_distill(_cfg(tmp_path, data, "rolled", server_teacher, "rollout.engine=openai", remote,
                              "rollout.temperature=0.7"))
    first = rolled["first"]
    assert first["on_policy"] == 1.0 and 2 <= first["rollout_tokens"] <= 16 and first["rollout_age"] == 0
    assert rolled["teacher"] == {"server": "llama_cpp", "base_url": llama_server, "model": "smollm2"}
