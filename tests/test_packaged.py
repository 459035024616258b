"""Slow tests on the real packaged models (installed by `make test`; run in CI too)."""

import json
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teacherfit.cli import app
from teacherfit.data import Record, chat_template_for, tokenize_example
from teacherfit.models import (PACKAGED, ModelError, load_model, load_model_config, load_tokenizer, packaged_gguf_path,
                               resolve_model)

pytestmark = pytest.mark.slow

VOCAB = {"smollm2-135m-instruct": 49152, "gemma-3-270m": 262144,
         "qwen2.5-coder-0.5b-instruct": 151936, "qwen2.5-coder-1.5b-instruct": 151936}


@pytest.mark.parametrize("name", list(PACKAGED))
def test_packaged_model_is_verified_converted_and_loads(name):
    path = packaged_gguf_path(name)  # sha256-checked
    assert path.stat().st_size == PACKAGED[name].size
    loaded = load_model(name)
    assert loaded.provenance["sha256"] == PACKAGED[name].sha256
    assert loaded.model.get_output_embeddings().weight.shape[0] == VOCAB[name]
    assert chat_template_for(loaded.tokenizer)[1] is (not PACKAGED[name].has_chat_template)


def test_gguf_file_path_loads_like_the_packaged_name():
    resolved = resolve_model(str(packaged_gguf_path("smollm2-135m-instruct")))
    assert resolved.kind == "gguf" and resolved.provenance["sha256"] == PACKAGED["smollm2-135m-instruct"].sha256


def test_gguf_tokenizer_is_read_without_dequantising(tmp_path, monkeypatch):
    """Tokenizer and head-size checks on a GGUF teacher run on its metadata alone, before (and without) the
    conversion that takes 119 s and 3.4 GB for the 1.5B model; both are the ones the converted model carries."""
    loaded = load_model("smollm2-135m-instruct")  # the default cache: converted once
    reference = loaded.tokenizer
    monkeypatch.setenv("TEACHERFIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    tok = load_tokenizer("smollm2-135m-instruct")
    first = time.perf_counter() - start
    config = load_model_config("smollm2-135m-instruct")
    assert not (tmp_path / "converted").exists()  # nothing was dequantised
    for key in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(loaded.model.config, key), key
    start = time.perf_counter()
    again = load_tokenizer("smollm2-135m-instruct")  # read from the small tokenizer folder
    assert time.perf_counter() - start < 5 and first < 60
    chat = [{"role": "user", "content": "Write a function that reverses a list."},
            {"role": "assistant", "content": "def rev(xs):\n    return xs[::-1]"}]
    for t in (tok, again):
        assert len(t) == len(reference) == VOCAB["smollm2-135m-instruct"] and t.chat_template == reference.chat_template
        assert tokenize_example(t, chat).input_ids == tokenize_example(reference, chat).input_ids


def test_gguf_cut_inside_its_tensors_names_the_file(tmp_path, monkeypatch):
    """An interrupted download: the header parses, the tensor data stops half way."""
    monkeypatch.setenv("TEACHERFIT_CACHE", str(tmp_path / "cache"))
    whole = packaged_gguf_path("smollm2-135m-instruct")
    cut = tmp_path / whole.name
    with open(whole, "rb") as fh:
        cut.write_bytes(fh.read(whole.stat().st_size // 2))
    with pytest.raises(ModelError) as err:
        load_model(str(cut))
    msg = str(err.value)
    assert msg.startswith(f"{cut} is not a complete GGUF file (") and "download it again" in msg and "\n" not in msg


def test_qwen_coder_pair_shares_the_tokenizer():
    from teacherfit.models import load_tokenizer

    small, large = load_tokenizer("qwen2.5-coder-0.5b-instruct"), load_tokenizer("qwen2.5-coder-1.5b-instruct")
    chat = [{"role": "user", "content": "Write a function that reverses a list."},
            {"role": "assistant", "content": "def rev(xs):\n    return xs[::-1]"}]
    a, b = tokenize_example(small, chat), tokenize_example(large, chat)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert small.decode([i for i in a.labels if i != -100]).startswith("def rev(xs):")


def test_real_judge_prefers_a_correct_answer():
    from teacherfit.rewards import LocalJudgeReward

    judge = LocalJudgeReward(load_model("qwen2.5-coder-1.5b-instruct"))
    q = [{"role": "user", "content": "What is the capital of France?"}]
    good = Record.from_messages(q + [{"role": "assistant", "content": "The capital of France is Paris."}])
    bad = Record.from_messages(q + [{"role": "assistant", "content": "Bananas are yellow."}])
    g, b = judge.score([good, bad])
    assert 1 <= b < g <= 10 and g - b > 1


def test_quickstart_end_to_end(tmp_path):
    """The embedded default, shortened (8 instructions, 2 distillation steps, 1 DAE step on 8 samples, 2 held-out
    samples per set) to fit CI; same code path."""
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), "--set", "rank.bootstrap=200",
                                      "--set", "rank.limit=8", "--set", "distill.train.max_steps=2",
                                      "--set", "align.train.max_steps=1", "--set", "align.data.limit=8",
                                      "--set", "align.heldout.limit=2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    results = json.loads((tmp_path / "qs" / "rank" / "results.json").read_text())
    teachers = results["teachers"]
    assert {t["teacher"] for t in teachers} == {"chatgpt", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                                "qwen2.5-coder-1.5b-instruct"}
    assert summary["ranking_by_car"] == [t["teacher"] for t in teachers]
    for t in teachers:
        assert t["n"] == 8
        assert 1 <= t["reward"] <= 10 and 0 < t["loss_student"] < 10
        assert t["car"] == pytest.approx(t["reward"] / (1 + results["beta"] * t["loss_student"]), rel=1e-9)
        assert math.isfinite(t["ifd_student"]) and math.isnan(t["ppl_ref"])  # no reference LM in the quickstart
    assert results["car_variant"] == "plain"  # judge ratings are positive
    assert any("no chat template" in n for n in results["notes"])  # Gemma-3-270M base
    assert (tmp_path / "qs" / "rank" / "report.html").stat().st_size > 20_000
    # then the distillation phase: a half-depth SmolLM2 trained with logit + attention KD
    distill = json.loads((tmp_path / "qs" / "distill" / "summary.json").read_text())
    assert distill["student_layers"] == 15 and distill["steps"] == 2
    assert distill["layer_map"]["14"] == 29 and len(distill["layer_map"]) == 15
    first, last = distill["first"], distill["final"]
    assert all(math.isfinite(first[k]) and first[k] > 0 for k in ("loss", "ce", "kd", "attn"))
    assert all(math.isfinite(last[k]) and last[k] > 0 for k in ("loss", "kd", "attn"))
    assert first["loss"] == pytest.approx(first["ce"] * 0 + first["kd"] + first["attn"], rel=1e-6)  # lambda = 1
    assert (tmp_path / "qs" / "distill" / "model" / "model.safetensors").exists()
    assert "distill" in summary["seconds"]
    # then DAE: the coder expert on code prompts, the student's starting weights on chat prompts
    align = json.loads((tmp_path / "qs" / "align" / "results.json").read_text())
    assert align["routing"]["source"] == "classifier" and align["routing"]["counts"]["domain"] >= 1
    assert align["routing"]["agreement_with_flag"]["agree"] == 8  # the MiniLM classifier agrees with the flags
    assert align["teachers"]["reference"]["kind"].startswith("the student's starting weights")
    first = align["first"]
    assert first["loss"] == pytest.approx(first["kd"], rel=1e-6)  # lambda = 1
    assert first["kd"] == pytest.approx(first["kd_domain"] + first["kd_general"], rel=1e-6)
    assert first["kd_general"] == pytest.approx(0.0, abs=1e-5)  # step 1: LoRA is zero, the student is its start
    assert first["kd_domain"] > 0.01
    assert [r["set"].split(" ")[0] for r in align["heldout"]["table"]] == ["domain", "general"]
    assert all(0 < r["loss_before"] < 10 and 0 < r["loss_after"] < 10 for r in align["heldout"]["table"])
    assert (tmp_path / "qs" / "align" / "report.html").exists() and "align" in summary["seconds"]
    assert align["teachers"]["expert"]["cache"].endswith("expert-cache")  # the packaged cache: no 1.5B load
    assert align["teachers"]["expert"]["model"] == "qwen2.5-coder-1.5b-instruct"
    # the closing summary says what each phase's own results say
    pick = results["recommendation"]
    assert summary["rank"]["pick"] == pick["teacher"] == teachers[0]["teacher"]
    assert summary["rank"]["p_beats_runner_up"] == pick["p_beats_runner_up"]
    assert summary["rank"]["supported"] == pick["supported"] and summary["rank"]["verdict"] == pick["text"]
    assert results["recommendation"]["beta_is_default"] and any("uncalibrated" in n for n in results["notes"])
    d = summary["distill"]
    assert (d["kd_first"], d["kd_final"], d["steps"]) == (distill["first"]["kd"], distill["final"]["kd"], 2)
    table = {r["set"].split(" ")[0]: r for r in align["heldout"]["table"]}
    assert summary["align"]["heldout"] == {k: {"before": r["loss_before"], "after": r["loss_after"]}
                                           for k, r in table.items()}
    assert set(summary["reports"]) == {"rank", "distill", "align"}
    assert all(Path(p).is_file() for p in summary["reports"].values())
    out = " ".join(result.output.split())
    assert "quickstart phase 1/3: rank" in out and "quickstart phase 3/3: align" in out
    assert f"KD loss {d['kd_first']:.3f} at step 1 -> {d['kd_final']:.3f} at step 2" in out
    assert f"domain loss {table['domain']['loss_before']:.3f} -> {table['domain']['loss_after']:.3f}" in out
    assert summary["peak_rss_mb"]["total"] == max(summary["peak_rss_mb"][k] for k in ("rank", "distill", "align"))
