"""Offline teacher top-k cache: writer/reader round trip, the cache-teacher pipeline against a naive
teacher, resume after a crash, and the tokenizer digest. Tiny models only."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from tiny import CHATML, save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacherfit.config import (
    CacheTeacherConfig,
    ModelOptions,
    ResponseSetConfig,
    TrainData,
)
from teacherfit.distill import cache as cache_mod
from teacherfit.distill.cache import (
    CACHE_FORMAT,
    CacheError,
    CacheMismatchError,
    TopKCache,
    TopKCacheWriter,
    tail_uniforms,
    tokenizer_digest,
    topk_with_tail_draws,
)
from teacherfit.distill.examples import tokenize_records, training_records
from teacherfit.distill.losses import chunked_head_losses, forward_kl, forward_kl_topk
from teacherfit.pipelines.cache_teacher import run_cache_teacher

# Relative precision of a stored log-prob: half a unit in the last place of the stored dtype, plus the
# same again for the reader's log-sum-exp shift (int32-fp16-lse, the default).
RTOL = {"int32-fp32": 1e-7, "int32-fp16": 2**-11, "int32-fp16-lse": 2**-10, "int32-bf16-lse": 2**-7}


def writer(path, k, encoding=cache_mod.DEFAULT_ENCODING, per_shard=2, **meta):
    kwargs = dict(teacher_provenance={"model": "tiny"}, tokenizer_digest="d" * 64, max_length=64)
    kwargs.update(meta)
    return TopKCacheWriter(path, top_k=k, examples_per_shard=per_shard, encoding=encoding, **kwargs)


def random_topk(n, k, vocab=1000, seed=0, tail_samples=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    uniforms = torch.rand(n, tail_samples, generator=g)
    return topk_with_tail_draws(logits, k=k, tail_samples=tail_samples, uniforms=uniforms)


# ---------------------------------------------------------------- writer / reader


@pytest.mark.parametrize("encoding", sorted(RTOL))
@pytest.mark.parametrize("tail_samples", [0, 3])
def test_round_trip_values_within_stored_precision(tmp_path, encoding, tail_samples):
    rows = {key: random_topk(n, 8, seed=seed, tail_samples=tail_samples)
            for key, n, seed in (("a", 3, 1), ("b", 0, 2), ("c", 5, 3))}
    with writer(tmp_path, 8, encoding, tail_samples=tail_samples) as w:
        for key, (ids, lps) in rows.items():
            w.add(key, ids, lps)
    cache = TopKCache(tmp_path)
    assert len(cache) == 3 and "a" in cache and "zz" not in cache and cache.tokens == 8
    assert cache.meta["bytes_per_token"] == cache_mod.ENCODINGS[encoding].bytes_per_token(8)
    assert cache.loss_kwargs() == ({"tail_samples": 3} if tail_samples else {})
    for key, (ids, lps) in rows.items():
        got_ids, got_lps = cache.get(key)
        assert got_ids.dtype == torch.long and got_lps.dtype == torch.float32
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_lps, lps, rtol=RTOL[encoding], atol=1e-7)
        if cache_mod.ENCODINGS[encoding].stores_logsumexp and len(ids):
            # the top entries' mass, hence the tail the loss derives, is exact to fp32 precision
            top = slice(0, 8 - tail_samples)
            torch.testing.assert_close(torch.logsumexp(got_lps[:, top], -1), torch.logsumexp(lps[:, top], -1),
                                       rtol=0, atol=1e-6)
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


# ---------------------------------------------------------------- tail draws and the loss


def test_tail_draws_follow_the_teacher_tail_and_are_reproducible():
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)) * 2
    n = 20000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(1))
    # many draws of one row: the row repeated, 3 top entries and one draw each
    ids, lps = topk_with_tail_draws(logits.expand(n, -1), k=4, tail_samples=1, uniforms=u)
    logp = F.log_softmax(logits[0], -1)
    top = logp.topk(3).indices
    assert torch.equal(ids[:, :3], top.expand(n, -1))
    torch.testing.assert_close(lps, logp[ids])
    tail = logp.exp().scatter(0, top, 0.0)
    freq = torch.bincount(ids[:, 3], minlength=12).float() / n
    assert freq[top].sum() == 0
    torch.testing.assert_close(freq, tail / tail.sum(), rtol=0, atol=0.01)  # 3 sd of a frequency is < 0.011
    assert torch.equal(tail_uniforms("k1", 5, 3), tail_uniforms("k1", 5, 3))
    assert not torch.equal(tail_uniforms("k1", 5, 3), tail_uniforms("k2", 5, 3))


def test_sampled_tail_kl_is_unbiased_in_value_and_gradient():
    """E over the draw of forward_kl_topk(tail_samples=1) is the full-vocabulary KL, and so is its gradient."""
    g = torch.Generator().manual_seed(3)
    v, k_top = 10, 3
    t_logits, s_logits = torch.randn(v, generator=g) * 2, torch.randn(v, generator=g)
    t_logp = F.log_softmax(t_logits, -1)
    top = t_logp.topk(k_top).indices
    tail_ids = [j for j in range(v) if j not in top.tolist()]
    p_tail = t_logp.exp()[tail_ids]
    expected_value, expected_grad = 0.0, torch.zeros(v)
    for j, pj in zip(tail_ids, p_tail / p_tail.sum()):
        ids = torch.cat([top, torch.tensor([j])]).unsqueeze(0)
        s = s_logits.clone().unsqueeze(0).requires_grad_()
        kl = forward_kl_topk(s, ids, t_logp[ids], torch.zeros(1, dtype=torch.long), tail_samples=1)
        kl.backward()
        expected_value += pj * kl.detach()
        expected_grad += pj * s.grad[0]
    s = s_logits.clone().unsqueeze(0).requires_grad_()
    full = forward_kl(s, t_logits.unsqueeze(0), torch.zeros(1, dtype=torch.long))
    full.backward()
    torch.testing.assert_close(expected_value, full.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(expected_grad, s.grad[0], rtol=1e-5, atol=1e-7)
    # the bucket, with the same top entries, is a lower bound
    label = torch.zeros(1, dtype=torch.long)
    bucket = forward_kl_topk(s_logits.unsqueeze(0), top.unsqueeze(0), t_logp[top].unsqueeze(0), label)
    assert bucket < full.detach() - 1e-3


def test_sampled_tail_kl_at_temperature_converges():
    """At tau != 1 the draws are importance-reweighted: many draws give the full tempered KL."""
    g = torch.Generator().manual_seed(4)
    v, n_draws = 10, 20000
    t_logits, s_logits = torch.randn(1, v, generator=g) * 2, torch.randn(1, v, generator=g)
    # one position with 3 top entries and n_draws >> V draws (K > V, so built from one-draw rows)
    top_ids, top_lps = topk_with_tail_draws(t_logits, k=3)
    draw_ids, draw_lps = topk_with_tail_draws(t_logits.expand(n_draws, -1), k=4, tail_samples=1,
                                              uniforms=torch.rand(n_draws, 1, generator=g))
    ids = torch.cat([top_ids, draw_ids[:, 3].unsqueeze(0)], dim=-1)
    lps = torch.cat([top_lps, draw_lps[:, 3].unsqueeze(0)], dim=-1)
    labels = torch.zeros(1, dtype=torch.long)
    for tau in (0.7, 2.0):
        full = forward_kl(s_logits, t_logits, labels, temperature=tau)
        est = forward_kl_topk(s_logits, ids, lps, labels, temperature=tau, tail_samples=n_draws)
        assert est.item() == pytest.approx(full.item(), rel=0.02)
    with pytest.raises(ValueError, match="tail_samples must be an integer"):
        forward_kl_topk(s_logits, ids, lps, labels, tail_samples=n_draws + 4)
    with pytest.raises(ValueError, match="renormalize"):
        forward_kl_topk(s_logits, ids, lps, labels, tail_samples=1, tail="renormalize")


def test_chunked_head_losses_reads_cache_rows_with_tail_draws():
    """The training path (chunked LM head, divergence_kwargs from the cache) equals forward_kl_topk."""
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 7, 8, 9]])
    t_logits = torch.randn(2, 5, 40, generator=g) * 3
    ids, lps = topk_with_tail_draws(t_logits.reshape(10, 40), k=8, tail_samples=2,
                                    uniforms=torch.rand(10, 2, generator=g))
    ids, lps = ids.reshape(2, 5, 8), lps.reshape(2, 5, 8)
    sums = chunked_head_losses(hidden, head, labels, teacher_topk=(ids, lps), chunk_size=3,
                               divergence_kwargs={"tail_samples": 2.0}, ce_weight=0.0)  # as it comes from YAML
    plain = forward_kl_topk(head(hidden), ids, lps, labels, tail_samples=2)
    torch.testing.assert_close(sums["kd_sum"] / sums["n_tokens"], plain)
    sums["loss_sum"].backward()
    (want,) = torch.autograd.grad(plain * sums["n_tokens"], hidden)
    torch.testing.assert_close(hidden.grad, want)
    assert hidden.grad.abs().sum() > 0


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
    for k in (vocab, 8):
        summary = run_cache_teacher(config(workspace, root / f"k{k}", top_k=k, examples_per_shard=2))
        assert summary["examples"] == len(CHATS) and summary["k"] == k
        assert summary["tail_samples"] == (0 if k == vocab else k // 4)
        assert summary["tokens"] == sum(len(t) for _, _, t in reference.values())
        assert summary["payload_bytes_per_token"] == 6 * k + 4
        assert summary["bytes"] == sum(f.stat().st_size for f in (root / f"k{k}").iterdir()
                                       if f.name.startswith("shard-") or f.name == "index.json")
        assert json.loads((root / f"k{k}" / "summary.json").read_text()) == summary
        caches[k] = TopKCache(root / f"k{k}")
    assert caches[8].loss_kwargs() == {"tail_samples": 2}

    tol = dict(rtol=RTOL["int32-fp16-lse"], atol=1e-6)
    totals = {"full": 0.0, "bucket": 0.0, "sampled": 0.0}
    for key, (ex, t_logits, targets) in reference.items():
        t_logp = F.log_softmax(t_logits, dim=-1)
        ids, lps = caches[8].get(key)  # 6 top entries, then 2 tail draws
        torch.testing.assert_close(lps[:, :6], t_logp.topk(6, dim=-1).values, **tol)
        # every cached id carries the naive log-prob of that id (so top ties may only swap equal ids)
        torch.testing.assert_close(t_logp.gather(-1, ids), lps, **tol)
        assert not (ids[:, 6:, None] == ids[:, None, :6]).any()  # draws come from the tail

        with torch.no_grad():
            s_logits = student(input_ids=torch.tensor([ex.tokens.input_ids])).logits[0, :-1]
        s_logits = s_logits[torch.tensor(ex.tokens.labels[1:]) != -100]
        full = forward_kl(s_logits, t_logits, targets).item()
        # K = V (every token, no draws): only fp16 rounding of the log-probs separates the two
        all_ids, all_lps = caches[vocab].get(key)
        kl = forward_kl_topk(s_logits, all_ids, all_lps, targets, **caches[vocab].loss_kwargs()).item()
        assert kl == pytest.approx(full, rel=1e-3)
        # small K: the top entries with the bucket are a lower bound; the draws estimate what it misses
        bucket = forward_kl_topk(s_logits, ids[:, :6], lps[:, :6], targets).item()
        assert 0 < bucket <= full * (1 + 1e-6)
        sampled = forward_kl_topk(s_logits, ids, lps, targets, **caches[8].loss_kwargs()).item()
        for name, value in (("full", full), ("bucket", bucket), ("sampled", sampled)):
            totals[name] += value * len(targets)
    assert abs(totals["sampled"] - totals["full"]) < 0.5 * (totals["full"] - totals["bucket"]), totals

    # cached rows line up with the shifted labels of a padded batch
    keys = list(reference)
    labels = torch.full((len(keys), 64), -100)
    for row, key in enumerate(keys):
        shifted = reference[key][0].tokens.labels[1:]
        labels[row, : len(shifted)] = torch.tensor(shifted)
    ids, _ = caches[8].collate(keys, labels)
    assert torch.equal(ids[labels != -100], torch.cat([caches[8].get(k)[0] for k in keys]))


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
