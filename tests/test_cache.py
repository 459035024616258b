"""Offline teacher top-k cache: writer/reader round trip, the cache-teacher pipeline against a naive
teacher, resume after a crash, and the tokenizer digest. Tiny models only."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacherfit.config import CacheTeacherConfig, ModelOptions, ResponseSetConfig, TrainData
from teacherfit.distill import cache as cache_mod
from teacherfit.distill.cache import (
    CACHE_FORMAT,
    CacheError,
    CacheMismatchError,
    TopKCache,
    TopKCacheWriter,
    tokenizer_digest,
)
from teacherfit.distill.examples import tokenize_records, training_records
from teacherfit.distill.losses import forward_kl, forward_kl_topk
from teacherfit.pipelines.cache_teacher import run_cache_teacher
from tiny import CHATML, save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer

# Relative precision of a stored log-prob: half a unit in the last place of the stored dtype, plus the
# same again for the reader's log-sum-exp shift (int32-fp16-lse, the default).
RTOL = {"int32-fp32": 1e-7, "int32-fp16": 2**-11, "int32-fp16-lse": 2**-10, "int32-bf16-lse": 2**-7}


def writer(path, k, encoding=cache_mod.DEFAULT_ENCODING, per_shard=2, **meta):
    kwargs = dict(teacher_provenance={"model": "tiny"}, tokenizer_digest="d" * 64, max_length=64)
    kwargs.update(meta)
    return TopKCacheWriter(path, top_k=k, examples_per_shard=per_shard, encoding=encoding, **kwargs)


def random_topk(n, k, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = F.log_softmax(torch.randn(n, vocab, generator=g) * 3, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


# ---------------------------------------------------------------- writer / reader


@pytest.mark.parametrize("encoding", sorted(RTOL))
def test_round_trip_values_within_stored_precision(tmp_path, encoding):
    rows = {"a": random_topk(3, 8, seed=1), "b": random_topk(0, 8, seed=2), "c": random_topk(5, 8, seed=3)}
    with writer(tmp_path, 8, encoding) as w:
        for key, (ids, lps) in rows.items():
            w.add(key, ids, lps)
    cache = TopKCache(tmp_path)
    assert len(cache) == 3 and "a" in cache and "zz" not in cache and cache.tokens == 8
    assert cache.meta["bytes_per_token"] == cache_mod.ENCODINGS[encoding].bytes_per_token(8)
    for key, (ids, lps) in rows.items():
        got_ids, got_lps = cache.get(key)
        assert got_ids.dtype == torch.long and got_lps.dtype == torch.float32
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_lps, lps, rtol=RTOL[encoding], atol=1e-7)
        if cache_mod.ENCODINGS[encoding].stores_logsumexp and len(ids):
            # the top-k mass, hence the tail the loss derives, is exact to fp32 precision
            torch.testing.assert_close(torch.logsumexp(got_lps, -1), torch.logsumexp(lps, -1), rtol=0, atol=1e-6)
    assert sorted(f.name for f in tmp_path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]


def test_collate_aligns_rows_with_shifted_labels(tmp_path):
    rows = {"a": random_topk(3, 4, seed=1), "b": random_topk(2, 4, seed=2)}
    with writer(tmp_path, 4, "int32-fp32") as w:
        for key, (ids, lps) in rows.items():
            w.add(key, ids, lps)
    cache = TopKCache(tmp_path / "index.json")
    labels = torch.tensor([[-100, 5, 6, -100, 7, -100], [-100, -100, 9, 9, -100, -100]])
    ids, lps = cache.collate(["a", "b"], labels)
    assert ids.shape == (2, 6, 4) and ids.dtype == torch.long and lps.dtype == torch.float32
    for row, key in enumerate(["a", "b"]):
        places = (labels[row] != -100).nonzero().squeeze(-1)
        assert torch.equal(ids[row, places], rows[key][0])
        assert torch.equal(lps[row, places], rows[key][1])
        pad = labels[row] == -100
        assert (ids[row, pad] == 0).all() and torch.isneginf(lps[row, pad]).all()

    with pytest.raises(CacheMismatchError, match="example a: the batch has 2 loss positions but the teacher cache has 3"):
        cache.collate(["a", "a"], labels)  # row 1 of labels has 2 loss positions, "a" has 3 rows
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.collate(["a", "missing"], labels)


def test_writer_refuses_duplicates_and_other_settings(tmp_path):
    ids, lps = random_topk(2, 4)
    w = writer(tmp_path, 4, per_shard=1)
    w.add("a", ids, lps)  # flushed at once (one example per shard)
    with pytest.raises(ValueError, match="already in the cache"):
        w.add("a", ids, lps)
    with pytest.raises(ValueError, match=r"\[N, K\] with K = 4"):
        w.add("b", ids[:, :3], lps[:, :3])
    w.close()
    assert writer(tmp_path, 4).done_keys() == {"a"}  # same settings: resumes
    with pytest.raises(CacheError, match="k: cache has 4, this run 8"):
        writer(tmp_path, 8)
    with pytest.raises(CacheError, match="tokenizer_digest"):
        writer(tmp_path, 4, tokenizer_digest="e" * 64)
    with pytest.raises(CacheError, match="not a teacher cache"):
        TopKCache(tmp_path / "elsewhere")


# ---------------------------------------------------------------- tokenizer digest


def test_tokenizer_digest(tmp_path, tokenizer, base_tokenizer):
    digest = tokenizer_digest(tokenizer)
    assert len(digest) == 64
    assert tokenizer_digest(tiny_tokenizer(vocab_size=300)) != digest  # another vocabulary
    assert tokenizer_digest(base_tokenizer) != digest  # same vocabulary, no chat template
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path)) == digest  # save/load round trip
    # A template that renders plain chats identically (it differs in a branch they never take) is the same
    # tokenizer for the cache, as for the packaged Qwen2.5-Coder 0.5B / 1.5B pair.
    other = tiny_tokenizer()
    other.chat_template = "{% if tools %}{{ 'tools!' }}{% endif %}" + CHATML
    assert tokenizer_digest(other) == digest
    other.chat_template = CHATML.replace("'\n' + message['content']", "':\n' + message['content']")
    assert tokenizer_digest(other) != digest


# ---------------------------------------------------------------- the cache-teacher pipeline

CHATS = [
    ("Write a short poem about the sea.", "The sea is blue and the sky is wide."),
    ("List three colours.", "Red, green and blue."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("def add(a, b):", "    return a + b"),
    ("Translate good morning into French.", "Bonjour."),
]


def sharpened(model, scale=8.0):
    """Scale the final norm so the logits are peaked like a trained LM's (random tiny models are near-uniform)."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cache")
    teacher = save_tiny(sharpened(tiny_qwen2(tokenizer, seed=11)), tokenizer, root / "teacher")
    responses = root / "responses.jsonl"
    responses.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in CHATS))
    return root, teacher, responses


def config(workspace, out, **values):
    _, teacher, responses = workspace
    return CacheTeacherConfig(teacher=str(teacher), data=TrainData(responses=[ResponseSetConfig(name="t", path=responses)]),
                              max_length=64, max_tokens=64, models=ModelOptions(device="cpu"), out=out, **values)


def naive_teacher(workspace, tokenizer):
    """Per example: full-vocabulary teacher log-probs at the loss positions, one example at a time, no padding."""
    _, teacher, _ = workspace
    cfg = config(workspace, None)
    examples, _ = tokenize_records(training_records(cfg.data), tokenizer, cfg.max_length)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    out = {}
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.tokens.input_ids])).logits[0, :-1].float()
            keep = torch.tensor(ex.tokens.labels[1:]) != -100
            out[ex.key] = (ex, logits[keep], torch.tensor(ex.tokens.input_ids)[1:][keep])
    return out


def test_cache_teacher_matches_naive_topk_and_kl(workspace, tokenizer):
    root, _, _ = workspace
    reference = naive_teacher(workspace, tokenizer)
    vocab = len(tokenizer)
    student = sharpened(tiny_llama(tokenizer, seed=12))
    caches = {}
    for k in (vocab, 4):
        summary = run_cache_teacher(config(workspace, root / f"k{k}", top_k=k, examples_per_shard=2))
        assert summary["examples"] == len(CHATS) and summary["k"] == k
        assert summary["tokens"] == sum(len(t) for _, _, t in reference.values())
        assert summary["payload_bytes_per_token"] == 6 * k + 4
        assert summary["bytes"] == sum(f.stat().st_size for f in (root / f"k{k}").iterdir()
                                       if f.name.startswith("shard-") or f.name == "index.json")
        assert json.loads((root / f"k{k}" / "summary.json").read_text()) == summary
        caches[k] = TopKCache(root / f"k{k}")

    for key, (ex, t_logits, targets) in reference.items():
        t_logp = F.log_softmax(t_logits, dim=-1)
        naive_values, _ = t_logp.topk(4, dim=-1)
        ids, lps = caches[4].get(key)
        # same top-k log-probs; each cached id carries the naive log-prob of that id (ties may swap ids)
        torch.testing.assert_close(lps, naive_values, rtol=RTOL["int32-fp16-lse"], atol=1e-6)
        torch.testing.assert_close(t_logp.gather(-1, ids), lps, rtol=RTOL["int32-fp16-lse"], atol=1e-6)

        with torch.no_grad():
            s_logits = student(input_ids=torch.tensor([ex.tokens.input_ids])).logits[0, :-1]
        s_logits = s_logits[torch.tensor(ex.tokens.labels[1:]) != -100]
        full = forward_kl(s_logits, t_logits, targets).item()
        # K = V: only fp16 rounding of the log-probs separates the cache from the full teacher
        all_ids, all_lps = caches[vocab].get(key)
        assert forward_kl_topk(s_logits, all_ids, all_lps, targets).item() == pytest.approx(full, rel=1e-3)
        # small K: the coarsened (top-k + tail bucket) KL never exceeds the full KL
        assert 0 < forward_kl_topk(s_logits, ids, lps, targets).item() <= full * (1 + 1e-6)

    # cached rows line up with the shifted labels of a padded batch
    keys = list(reference)
    labels = torch.full((len(keys), 64), -100)
    for row, key in enumerate(keys):
        shifted = reference[key][0].tokens.labels[1:]
        labels[row, : len(shifted)] = torch.tensor(shifted)
    ids, _ = caches[4].collate(keys, labels)
    assert torch.equal(ids[labels != -100], torch.cat([caches[4].get(k)[0] for k in keys]))


def shard_keys(folder):
    index = json.loads((folder / "index.json").read_text())
    return Counter(key for s in index["shards"] for key, _ in cache_mod._shard_examples(folder / s["file"]))


def test_resume_after_crash_caches_each_example_once(workspace, monkeypatch):
    root, _, _ = workspace
    clean = root / "clean"
    run_cache_teacher(config(workspace, clean, top_k=5, examples_per_shard=2))
    crashed = root / "crashed"

    # 1) killed after the first shard, with one example buffered (and lost)
    real_add, calls = TopKCacheWriter.add, []

    def add_then_crash(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        real_add(self, *args)

    monkeypatch.setattr(TopKCacheWriter, "add", add_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cache_teacher(config(workspace, crashed, top_k=5, examples_per_shard=2))
    monkeypatch.undo()
    assert sum(shard_keys(crashed).values()) == 2

    # 2) killed between writing a shard and listing it in the index: an orphan shard file is left
    real_write = cache_mod.atomic_write_json

    def index_write_fails(*args):
        raise RuntimeError("simulated crash before the index")

    monkeypatch.setattr(cache_mod, "atomic_write_json", index_write_fails)
    with pytest.raises(RuntimeError, match="before the index"):
        run_cache_teacher(config(workspace, crashed, top_k=5, examples_per_shard=2))
    monkeypatch.setattr(cache_mod, "atomic_write_json", real_write)
    assert (crashed / "shard-00001.safetensors").exists() and sum(shard_keys(crashed).values()) == 2

    summary = run_cache_teacher(config(workspace, crashed, top_k=5, examples_per_shard=2))
    assert summary["resumed"] == 2 and summary["examples_now"] == len(CHATS) - 2
    counts = shard_keys(crashed)
    assert set(counts.values()) == {1} and set(counts) == set(shard_keys(clean))
    listed = {s["file"] for s in json.loads((crashed / "index.json").read_text())["shards"]}
    assert {f.name for f in crashed.glob("shard-*")} == listed  # the orphan was overwritten, nothing stray
    assert not list(crashed.glob(".*.tmp"))

    a, b = TopKCache(clean), TopKCache(crashed)
    assert a.meta == b.meta
    for key in a.keys():
        (ids_a, lps_a), (ids_b, lps_b) = a.get(key), b.get(key)
        torch.testing.assert_close(lps_b, lps_a, rtol=RTOL["int32-fp16-lse"], atol=1e-6)
        assert torch.equal(ids_a, ids_b)
    index = json.loads((crashed / "index.json").read_text())
    assert index["format"] == CACHE_FORMAT

    # re-running a finished cache computes nothing
    again = run_cache_teacher(config(workspace, crashed, top_k=5, examples_per_shard=2))
    assert again["examples_now"] == 0 and again["examples"] == len(CHATS)
