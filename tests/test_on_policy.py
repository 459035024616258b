"""On-policy distillation (kd.on_policy) on tiny real models: the step against a naive reference, the share,
the generation buffer, resume, DDP, align, and the refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from teacherfit.config import AlignConfig, DistillConfig, load_config
from teacherfit.data import Record, write_records
from teacherfit.distill.examples import collate, example_key, tokenize_records, training_records
from teacherfit.distill.train import Schedule
from procs import killed_and_resumed, read_log, write_config
from test_distill import QA, ws  # noqa: F401  (the same tiny teacher, student and data)
from tiny import save_tiny, tiny_llama

NEW = 6  # rollout.max_new_tokens in these tests


def _cfg(ws, out, *extra):
    root, teacher, student, data = ws
    return load_config(DistillConfig, None, [
        f"student={student}", f"teacher={teacher}", f"data.responses=[{{name: t, path: {data}}}]",
        "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2", "train.warmup_steps=1", "kd.w_attn=0",
        "train.lr=1e-3", "models.device=cpu", f"out={out}", "kd.on_policy=1", f"rollout.max_new_tokens={NEW}",
        *extra])


# ---------------------------------------------------------------- the naive reference


def naive_greedy(model, prompt: list[int], stop: int, new: int) -> list[int]:
    """Greedy decoding by full forward passes, one token at a time; the stop token is kept."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(new):
            y = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(y)
            ids.append(y)
            if y == stop:
                break
    return out


def naive_rollout_micros(cfg, tokenizer, student, step: int = 0):
    """The step's micro-batches with every response replaced by the student's greedy continuation of the
    prompt (the tokens before the first labelled one), labelled, prompts -100."""
    examples, _ = tokenize_records(training_records(cfg.data), tokenizer, cfg.train.max_length)
    micros = []
    for idx in Schedule(len(examples), cfg.train).step(step):
        batch = []
        for i in idx:
            ex = examples[i]
            first = next(t for t, y in enumerate(ex.tokens.labels) if y != -100)
            prompt = ex.tokens.input_ids[:first]
            gen = naive_greedy(student, prompt, tokenizer.eos_token_id, NEW)
            ex.tokens.input_ids, ex.tokens.labels = prompt + gen, [-100] * len(prompt) + gen
            batch.append(ex)
        micros.append(collate(batch, tokenizer.pad_token_id))
    return micros


def naive_terms(micros, student, teacher_of):
    """Per generated token (full logits, float64): CE, forward KL(p_T || p_S), and the sampled-token log-ratio
    log p_S(y) - log p_T(y); ``teacher_of(micro, row)`` gives the row's teacher logits."""
    ce, fkl, ratio = [], [], []
    for m in micros:
        with torch.no_grad():
            s = student(m.input_ids, attention_mask=m.attention_mask).logits.double()
        for b in range(m.input_ids.shape[0]):
            t = teacher_of(m, b)
            for pos in range(m.input_ids.shape[1] - 1):
                y = int(m.labels[b, pos + 1])
                if y == -100:
                    continue
                ls, lt = F.log_softmax(s[b, pos], -1), F.log_softmax(t[pos], -1)
                ce.append(-float(ls[y]))
                fkl.append(float((lt.exp() * (lt - ls)).sum()))
                ratio.append(float(ls[y] - lt[y]))
    return ce, fkl, ratio


def _models(ws):
    root, teacher_dir, student_dir, _ = ws
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()
    return load(student_dir), load(teacher_dir)


def _teacher_logits(teacher):
    def of(m, b):
        with torch.no_grad():
            return teacher(m.input_ids[b:b + 1], attention_mask=m.attention_mask[b:b + 1]).logits[0].double()
    return of


@pytest.mark.parametrize("lora", [False, True])
def test_an_on_policy_step_equals_the_naive_reference(ws, tokenizer, tmp_path, lora):
    """Greedy rollouts (so the reference can redo them): the student continues each prompt itself, the teacher
    scores those tokens, and the loss is on the generated tokens only. With LoRA the student samples through
    peft's wrapper (its adapters start at zero: the same model at the first step)."""
    from teacherfit.pipelines.distill import run_distill

    cfg = _cfg(ws, tmp_path / "run", "rollout.temperature=0", "train.max_steps=1",
               *(["lora={r: 4, alpha: 8}"] if lora else []))
    student, teacher = _models(ws)
    ce, fkl, _ = naive_terms(naive_rollout_micros(cfg, tokenizer, student), student, _teacher_logits(teacher))
    first = run_distill(cfg)["first"]
    assert first["tokens"] == len(ce)  # generated tokens only: no dataset response token is in the loss
    assert first["ce"] == pytest.approx(sum(ce) / len(ce), rel=1e-5)  # logged only: kd.lambda is 1 on-policy
    assert first["kd"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-5, abs=1e-7)
    assert first["loss"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-5, abs=1e-7)
    assert first["on_policy"] == 1.0 and first["rollout_tokens"] == len(ce) and first["rollout_age"] == 0


def test_sampled_token_reverse_kl_step_equals_the_naive_policy_gradient(ws, tokenizer, tmp_path):
    """kd.divergence sampled_reverse_kl: the logged kd is the mean log-ratio of the sampled tokens, and the
    gradient (its norm, before clipping) that of mean_t stopgrad(r_t) log p_S(y_t)."""
    from teacherfit.pipelines.distill import run_distill

    cfg = _cfg(ws, tmp_path / "run", "kd.divergence=sampled_reverse_kl", "rollout.temperature=0",
               "train.max_steps=1", "train.max_grad_norm=1e9")
    student, teacher = _models(ws)
    micros = naive_rollout_micros(cfg, tokenizer, student)
    _, _, ratio = naive_terms(micros, student, _teacher_logits(teacher))
    # the gradient of the surrogate by autograd on a fresh copy, tokens as above
    student.zero_grad()
    surrogate, i = 0.0, 0
    for m in micros:
        s = student(m.input_ids, attention_mask=m.attention_mask).logits.double()
        for b in range(m.input_ids.shape[0]):
            for pos in range(m.input_ids.shape[1] - 1):
                y = int(m.labels[b, pos + 1])
                if y != -100:
                    surrogate = surrogate + ratio[i] * F.log_softmax(s[b, pos], -1)[y]
                    i += 1
    (surrogate / len(ratio)).backward()
    norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None)))
    first = run_distill(cfg)["first"]
    assert first["kd"] == pytest.approx(sum(ratio) / len(ratio), rel=1e-5, abs=1e-6)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-4)


# ---------------------------------------------------------------- the share, the buffer, off-policy unchanged


def test_on_policy_zero_is_the_off_policy_run_and_one_uses_no_dataset_response(ws, tokenizer, tmp_path):
    from teacherfit.distill.rollouts import OnPolicy, TransformersRollouts, response_start
    from teacherfit.pipelines.distill import run_distill

    plain = run_distill(_cfg(ws, tmp_path / "plain", "kd.on_policy=0", "rollout.max_new_tokens=128"))
    zero = run_distill(_cfg(ws, tmp_path / "zero", "kd.on_policy=0", "rollout.buffer_steps=3",
                            "rollout.temperature=0.7"))
    a, b = read_log(tmp_path / "plain"), read_log(tmp_path / "zero")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip(a) == strip(b) and "on_policy" not in a[0]  # the same numbers, bit for bit
    # and those of the code before on-policy existed (commit 0dbfb3f, the same config, this machine: equal to
    # the last bit; 1e-6 leaves room for another CPU's rounding)
    before = [{"loss": 0.013091625180095434, "ce": 5.756394624710083, "grad_norm": 0.0165749192237854, "tokens": 102},
              {"loss": 0.013145862147212029, "ce": 5.760985970497131, "grad_norm": 0.01749734953045845, "tokens": 54}]
    for row, old in zip(a, before):
        for key, value in old.items():
            assert row[key] == pytest.approx(value, rel=1e-6), key
    assert plain["first"]["tokens"] == zero["first"]["tokens"]

    cfg = _cfg(ws, tmp_path / "x")
    examples, _ = tokenize_records(training_records(cfg.data), tokenizer, cfg.train.max_length)
    student, _ = _models(ws)
    schedule = Schedule(len(examples), cfg.train)
    engine = TransformersRollouts(student, tokenizer, torch.device("cpu"), batch_size=None)
    for share in (1.0, 0.3):
        on = OnPolicy(share, cfg.rollout, engine, examples, step_indices=schedule.step, total_steps=40,
                      max_length=cfg.train.max_length, seed=0, rank=0)
        counts = []
        for step in range(40 if share < 1 else 3):
            batches, info = on.examples_for(step)
            rows = [e for batch in batches for e in batch]
            changed = 0
            for e in rows:
                original = next(x for x in examples if x.key == e.key)
                start = response_start(original.tokens.labels)
                assert e.tokens.input_ids[:start] == original.tokens.input_ids[:start]  # the dataset prompt
                if e.tokens.labels != original.tokens.labels:
                    changed += 1
                    assert e.tokens.labels[start:] == e.tokens.input_ids[start:]  # every sampled token labelled
                    assert 1 <= len(e.tokens.input_ids) - start <= NEW
            assert changed == info["rollout_rows"]
            counts.append(changed / len(rows))
        if share == 1.0:
            assert counts == [1.0, 1.0, 1.0]  # no dataset response left
        else:
            # 4 rows a step: 0.3 x 4 = 1.2 rows, so 1 or 2 each step (stochastic rounding), 0.3 on average
            assert set(counts) == {0.25, 0.5}
            assert sum(counts) / len(counts) == pytest.approx(0.3, abs=0.05)


def test_the_generation_buffer_is_generated_once_per_window_and_its_age_logged(ws, tmp_path):
    from teacherfit.pipelines.distill import run_distill

    run_distill(_cfg(ws, tmp_path / "buf", "rollout.buffer_steps=3", "train.max_steps=5", "train.grad_accum=1"))
    rows = read_log(tmp_path / "buf")
    assert [r["rollout_age"] for r in rows] == [0, 1, 2, 0, 1]
    assert [r["rollout_s"] > 0 for r in rows] == [True, False, False, True, False]
    assert all(r["on_policy"] == 1.0 and r["rollout_tokens"] == r["tokens"] for r in rows)
    report = (tmp_path / "buf" / "report.html").read_text()
    assert f"On-policy: 100% of rows sampled by the student, {sum(r['tokens'] for r in rows)} tokens" in report


def test_a_killed_on_policy_run_resumes_with_the_same_loss_curve(ws, tmp_path):
    """Sampled rollouts (temperature 1), a buffer of 4 steps, killed after the checkpoint of step 6 (inside the
    second buffer): the resumed run trains on the very samples of the uninterrupted one."""
    root, teacher, student, data = ws

    def write(out):
        cfg = {"student": str(student), "teacher": str(teacher),
               "data": {"responses": [{"name": "t", "path": str(data)}]},
               "kd": {"w_attn": 0.0, "on_policy": 0.75}, "models": {"device": "cpu"},
               "rollout": {"max_new_tokens": NEW, "buffer_steps": 4, "temperature": 1.0},
               "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 10, "warmup_steps": 2, "lr": 1e-3,
                         "checkpoint_every": 3, "keep_checkpoints": 2},
               "out": str(out)}
        return write_config(tmp_path, out.name, cfg)

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    a, b = killed_and_resumed("distill", (write(ref), ref), (write(killed), killed))
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "tokens", "on_policy", "rollout_tokens", "rollout_age"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    assert (killed / "checkpoints" / "step-0000009" / "rollouts-rank0.json").exists()


def test_two_process_ddp_generates_each_processs_share_like_one_process(ws, tmp_path):
    """torchrun, 2 CPU processes, each generating its own rows (greedy): the same losses as one process with the
    same global batch; had one process kept dataset responses, tokens and losses would differ."""
    root, teacher, student, data = ws

    def write(name, grad_accum):
        cfg = {"student": str(student), "teacher": str(teacher),
               "data": {"responses": [{"name": "t", "path": str(data)}]}, "models": {"device": "cpu"},
               "kd": {"w_attn": 0.0, "on_policy": 1.0},
               "rollout": {"max_new_tokens": NEW, "temperature": 0.0},
               "train": {"batch_size": 2, "grad_accum": grad_accum, "max_steps": 2, "warmup_steps": 1, "lr": 1e-3},
               "out": str(tmp_path / name)}
        return write_config(tmp_path, name, cfg)

    single = subprocess.run([sys.executable, "-m", "teacherfit", "distill", "-c", str(write("single", 2))],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29563", "-m", "teacherfit", "distill", "-c", str(write("ddp", 1))],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "grad_norm", "tokens", "rollout_tokens", "on_policy"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["distribution"]["processes"] == 2


# ---------------------------------------------------------------- align


def test_on_policy_align_routes_the_students_samples_to_expert_or_reference(tokenizer, tmp_path):
    from teacherfit.pipelines.align import run_align

    root = tmp_path / "ws"
    expert = save_tiny(tiny_llama(tokenizer, seed=31, layers=3), tokenizer, root / "expert")
    reference = save_tiny(tiny_llama(tokenizer, seed=32, layers=1), tokenizer, root / "reference")
    student_dir = save_tiny(tiny_llama(tokenizer, seed=33, layers=2), tokenizer, root / "student")
    rows = [(q, a, i % 2 == 0) for i, (q, a) in enumerate(QA)]
    recs = [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                 meta={"domain": d}) for q, a, d in rows]
    data = write_records(root / "train.jsonl", recs)
    cfg = load_config(AlignConfig, None, [
        f"student={student_dir}", f"expert={expert}", f"reference={reference}",
        f"data.responses=[{{name: t, path: {data}}}]", "train.batch_size=2", "train.grad_accum=2",
        "train.max_steps=1", "train.warmup_steps=1", "train.lr=1e-3", "models.device=cpu", f"out={tmp_path / 'run'}",
        "kd.on_policy=1", "rollout.temperature=0", f"rollout.max_new_tokens={NEW}"])
    routes = {example_key(r): "domain" if d else "general" for r, (_, _, d) in zip(recs, rows)}
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()
    student, teachers = load(student_dir), {"domain": load(expert), "general": load(reference)}

    def teacher_of(m, b):
        with torch.no_grad():
            return teachers[routes[m.keys[b]]](m.input_ids[b:b + 1], attention_mask=m.attention_mask[b:b + 1]
                                               ).logits[0].double()

    micros = naive_rollout_micros(cfg, tokenizer, student)
    ce, fkl, _ = naive_terms(micros, student, teacher_of)
    summary = run_align(cfg)
    first = summary["first"]
    assert first["on_policy"] == 1.0 and first["tokens"] == len(ce)
    assert first["kd"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-5, abs=1e-7)
    assert first["loss"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-5, abs=1e-7)
    assert first["kd_domain"] > 0 and first["kd_general"] > 0


# ---------------------------------------------------------------- refusals


def test_on_policy_refusals_are_one_line_before_any_weights(ws, tmp_path):
    from typer.testing import CliRunner

    from teacherfit.cli import app

    root, teacher, student, data = ws
    base = [f"student={student}", f"teacher={teacher}", f"data.responses=[{{name: t, path: {data}}}]",
            "models.device=cpu", "kd.w_attn=0", f"out={tmp_path / 'r'}"]
    runner = CliRunner()

    def refused(*extra):
        result = runner.invoke(app, ["distill", *sum((["--set", s] for s in [*base, *extra]), [])])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "r" / "model").exists()
        return " ".join(result.output.split())

    assert "needs vLLM" in refused("kd.on_policy=1", "rollout.engine=vllm")
    assert "needs rollout.remote" in refused("kd.on_policy=1", "rollout.engine=openai")
    assert "set kd.on_policy=1" in refused("kd.divergence=sampled_reverse_kl", "kd.on_policy=0.5")
    assert "imitate its own samples" in refused("kd.on_policy=0.5", "kd.lambda=0.7")
    assert "no KD term" in refused("kd.on_policy=1", "kd.w_pred=0")
    assert "student_init" in refused("kd.on_policy=1", "rollout.engine=vllm", "student_init.layers=first:1")
    assert "lmbda" in refused("kd.lmbda=1") and "kd.on_policy" in refused("kd.lmbda=1")
    cache = tmp_path / "cache"
    cache.mkdir()
    text = refused("teacher=null", f"teacher_cache={cache}", "kd.on_policy=0.5")
    assert "cache" in text


# ---------------------------------------------------------------- a teacher behind a vLLM-protocol server


def _vllm_protocol_server(model, tokenizer):
    """A loopback HTTP server that answers as `vllm serve` does (the documented /v1/completions
    ``prompt_logprobs`` and /tokenize shapes), computing from a real tiny model in transformers: vLLM itself
    needs a CUDA machine."""
    from http.server import BaseHTTPRequestHandler

    from servers import serve_loopback

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, body):
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                return self._reply({"tokens": tokenizer.encode(body["prompt"], add_special_tokens=False),
                                    "count": 0, "max_model_len": 256})
            ids, k = body["prompt"], body["prompt_logprobs"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            entries = [None]
            for t in range(1, len(ids)):
                row = logp[t - 1]
                order = row.argsort(descending=True)
                rank = {int(tok): r + 1 for r, tok in enumerate(order.tolist())}
                keep = order[:k].tolist() + ([ids[t]] if ids[t] not in order[:k].tolist() else [])
                entries.append({str(tok): {"logprob": float(row[tok]), "rank": rank[tok], "decoded_token": ""}
                                for tok in keep})
            self._reply({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "teacher",
                         "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None,
                                      "prompt_logprobs": entries}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}})

    return serve_loopback(Handler)


def test_a_vllm_server_teacher_gives_top_k_and_sampled_log_probs(ws, tokenizer, tmp_path):
    """Top-k by rank and the label token's own log-prob from vLLM's prompt_logprobs; with top_k = the whole
    vocabulary, an on-policy forward-KL step through the server equals the naive full-vocabulary reference."""
    from teacherfit.config import ServerTeacherConfig
    from teacherfit.distill.teachers import ServerTeacher
    from teacherfit.pipelines.distill import run_distill

    student, teacher = _models(ws)
    V = teacher.config.vocab_size
    with _vllm_protocol_server(teacher, tokenizer) as (url, _):
        cfg = ServerTeacherConfig(remote={"base_url": url, "model": "teacher"}, server="vllm", top_k=5)
        examples, _ = tokenize_records(training_records(_cfg(ws, tmp_path / "x").data), tokenizer, 256)
        micro = collate(examples[:3], tokenizer.pad_token_id)
        topk = ServerTeacher(cfg, tokenizer, mode="topk", student_device=torch.device("cpu")).head_signal(micro).topk
        sampled = ServerTeacher(cfg, tokenizer, mode="sampled",
                                student_device=torch.device("cpu")).head_signal(micro).sampled
        with torch.no_grad():
            logp = teacher(micro.input_ids, attention_mask=micro.attention_mask).logits.log_softmax(-1)[:, :-1]
        loss = micro.labels[:, 1:] != -100
        best = logp.topk(5, dim=-1)
        assert torch.equal(topk[0][loss], best.indices[loss])
        assert torch.allclose(topk[1][loss], best.values[loss], atol=1e-5)
        own = logp.gather(-1, micro.input_ids[:, 1:, None]).squeeze(-1)
        assert torch.allclose(sampled[loss], own[loss], atol=1e-5)

        server = f"teacher={{backend: openai, server: vllm, top_k: {V}, remote: {{base_url: '{url}', model: teacher}}}}"
        run_cfg = _cfg(ws, tmp_path / "run", server, "rollout.temperature=0", "train.max_steps=1")
        ce, fkl, _ = naive_terms(naive_rollout_micros(run_cfg, tokenizer, student), student, _teacher_logits(teacher))
        first = run_distill(run_cfg)["first"]
    assert first["tokens"] == len(ce) and first["unscored_tokens"] == 0
    assert first["kd"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-4, abs=1e-6)
    assert first["loss"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-4, abs=1e-6)


def test_rollouts_sample_the_students_whole_distribution(ws, tokenizer):
    """No top-k cut (transformers' default 50) or other generation-config default: at temperature 1 the tiny
    student (vocabulary 320, nearly flat) samples tokens ranked past 50."""
    from teacherfit.config import DecodingConfig
    from teacherfit.distill.rollouts import TransformersRollouts

    student, _ = _models(ws)
    student.generation_config.top_k = 5  # a shipped default that must not apply
    from teacherfit.data import tokenize_prompt

    prompt = tokenize_prompt(tokenizer, [{"role": "user", "content": "Say hello."}])
    engine = TransformersRollouts(student, tokenizer, torch.device("cpu"), batch_size=None)
    out = engine.generate([list(prompt)] * 16, DecodingConfig(max_new_tokens=1, temperature=1.0, seed=3))
    with torch.no_grad():
        row = student(torch.tensor([list(prompt)])).logits[0, -1]
    ranks = [int((row > row[ids[0]]).sum()) + 1 for ids in out]
    assert max(ranks) > 50, ranks
    assert student.generation_config.top_k == 5  # restored


@pytest.mark.parametrize("lora", [False, True])
def test_the_second_steps_rollouts_come_from_the_weights_after_the_first(ws, tokenizer, tmp_path, lora):
    """Live weights: step 2's samples are the greedy continuations of the student as step 1 left it (the saved,
    merged model of a 1-step run that step 2 resumes from), not of its starting weights; LoRA included."""
    from teacherfit.pipelines.distill import run_distill

    extra = ["rollout.temperature=0", "train.checkpoint_every=1", "train.lr=5e-2", "train.warmup_steps=0",
             *(["lora={r: 4, alpha: 8}"] if lora else [])]
    one = run_distill(_cfg(ws, tmp_path / "run", "train.max_steps=1", *extra))
    after_one = AutoModelForCausalLM.from_pretrained(one["model_dir"]).eval()
    start, teacher = _models(ws)
    cfg = _cfg(ws, tmp_path / "run", "train.max_steps=2", *extra)
    two = run_distill(cfg)  # resumes from step 1's checkpoint
    assert two["resumed_from"] == 1
    micros = naive_rollout_micros(cfg, tokenizer, after_one, step=1)
    _, fkl, _ = naive_terms(micros, after_one, _teacher_logits(teacher))
    assert two["final"]["tokens"] == len(fkl)
    assert two["final"]["kd"] == pytest.approx(sum(fkl) / len(fkl), rel=1e-4, abs=1e-6)
    stale = naive_rollout_micros(cfg, tokenizer, start, step=1)
    assert any(not torch.equal(a.input_ids, b.input_ids) for a, b in zip(micros, stale))  # the check can fail
