"""`teacherfit cache-teacher`: run the teacher once, store its top-k next-token log-probs for training.

The cache holds one row of ``top_k`` columns per loss position (t with ``labels[t + 1] != -100``) of every
training example: the teacher's ``top_k - top_k // 4`` most likely next tokens, then ``top_k // 4`` draws
from the rest of its distribution, which keep the KL unbiased (no draws when ``top_k`` covers the
vocabulary). ``teacherfit distill`` with ``teacher_cache`` then reads it and never loads the teacher.
Storage format, the tail draws and the measured accuracy: ``teacherfit.distill.cache``.

Resumable like `generate`: shards and the index are written atomically, and the index lists only complete
shards, so a run killed at any instant and restarted with the same output folder skips the examples in
listed shards and recomputes the rest; every example ends up cached exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from teacherfit.config import CacheTeacherConfig, prepare_run_dir
from teacherfit.distill.cache import (
    TopKCacheWriter,
    default_tail_samples,
    tail_uniforms,
    tokenizer_digest,
    topk_with_tail_draws,
)
from teacherfit.distill.examples import TrainExample, tokenize_records, training_records
from teacherfit.models import (
    load_model,
    load_text_config,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)
from teacherfit.scoring import length_sorted_batches, lm_head_logits, pad_batch
from teacherfit.store import atomic_write_json
from teacherfit.ui import console, progress_bar

HEAD_CHUNK = 512  # loss positions per LM-head call: bounds the fp32 logits to HEAD_CHUNK x vocabulary
MAX_BATCH = 64  # examples per forward batch, on top of the token budget


def teacher_vocab(cfg: CacheTeacherConfig) -> int:
    """Rows of the teacher's output head, from its config (no weights loaded)."""
    return load_text_config(cfg.teacher, trust_remote_code=cfg.models.trust_remote_code)[1].vocab_size


def cached_rows(tokenizer, head_rows: int) -> int:
    """The vocabulary the cache's distributions are over: the tokenizer's ids, not the head's padded rows.

    Heads are often padded past the tokenizer (Qwen2.5-7B: 152,064 rows for 151,936 tokens); a padded row is
    never a token, so it must not take probability mass nor be drawn into the tail (its id would index past a
    student head of the tokenizer's size). A tokenizer may also list a token past the head's last row (an
    added unknown token the model never saw); the head cannot predict it, so the rows end with the head."""
    return min(len(tokenizer), head_rows)


def teacher_identity(cfg: CacheTeacherConfig) -> dict:
    """Which teacher, at which precision, without loading it (stored in the cache's meta)."""
    resolved = resolve_model(cfg.teacher)
    dtype = pick_dtype(cfg.models.dtype, pick_device(cfg.models.device))
    return dict(resolved.provenance, kind=resolved.kind, dtype=str(dtype).removeprefix("torch."))


@torch.inference_mode()
def teacher_topk(
    model,
    examples: Sequence[TrainExample],
    *,
    top_k: int,
    tail_samples: int = 0,
    sample_seed: int = 0,
    vocab_rows: int | None = None,
    pad_token_id: int,
    max_tokens: int,
    max_batch: int = MAX_BATCH,
    head_chunk: int = HEAD_CHUNK,
) -> Iterator[tuple[list[tuple[TrainExample, torch.Tensor, torch.Tensor]], int]]:
    """Per length-sorted batch: ``[(example, ids [N, K] int64, logprobs [N, K] fp32), ...]`` and its real tokens.

    The decoder runs on the padded batch; the LM head runs only on the hidden states of loss positions,
    ``head_chunk`` at a time, so the full [B, T, V] logits never exist. Each chunk's fp32 logits (post-head
    transform applied, cut to the first ``vocab_rows`` rows, default all) become cache rows with
    ``topk_with_tail_draws`` (top K - S, then S tail draws from per-example uniforms).
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    vocab = vocab_rows or model.get_output_embeddings().weight.shape[0]
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({vocab} tokens): lower top_k")
    lengths = [len(ex.tokens.input_ids) for ex in examples]
    for batch in length_sorted_batches(lengths, max_tokens=max_tokens, max_batch=max_batch):
        ids, mask = pad_batch([examples[i].tokens.input_ids for i in batch], pad_token_id)
        labels, _ = pad_batch([examples[i].tokens.labels for i in batch], -100)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        keep = labels[:, 1:] != -100  # position t predicts token t + 1 (right padding: positions 0..n-1)
        h = hidden[:, :-1][keep]  # row-major: example by example, positions in order
        del hidden
        counts = keep.sum(dim=1).tolist()
        uniforms = torch.cat([tail_uniforms(examples[i].key, n, tail_samples, sample_seed)
                              for i, n in zip(batch, counts)]).to(device)
        top_ids = torch.empty(h.shape[0], top_k, dtype=torch.long)
        top_lps = torch.empty(h.shape[0], top_k, dtype=torch.float32)
        for s in range(0, h.shape[0], head_chunk):
            logits = lm_head_logits(model, h[s : s + head_chunk])[:, :vocab]
            ids_c, lps_c = topk_with_tail_draws(logits, k=top_k, tail_samples=tail_samples,
                                                uniforms=uniforms[s : s + head_chunk])
            top_ids[s : s + head_chunk], top_lps[s : s + head_chunk] = ids_c.cpu(), lps_c.cpu()
            del logits
        out, start = [], 0
        for i, n in zip(batch, counts):
            out.append((examples[i], top_ids[start : start + n], top_lps[start : start + n]))
            start += n
        yield out, int(mask.sum())


def run_cache_teacher(cfg: CacheTeacherConfig) -> dict:
    records = training_records(cfg.data)
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.models.trust_remote_code)
    examples, token_stats = tokenize_records(records, tokenizer, cfg.max_length)
    vocab_rows = cached_rows(tokenizer, teacher_vocab(cfg))
    if cfg.top_k > vocab_rows:
        raise ValueError(f"top_k={cfg.top_k} exceeds the teacher's vocabulary ({vocab_rows} tokens): lower top_k")
    run_dir = prepare_run_dir(cfg, "cache-teacher")  # the inputs hold up: the run starts here
    tail_samples = default_tail_samples(cfg.top_k, vocab_rows)
    writer = TopKCacheWriter(
        run_dir,
        top_k=cfg.top_k,
        tail_samples=tail_samples,
        teacher_provenance=teacher_identity(cfg),
        tokenizer_digest=tokenizer_digest(tokenizer),
        max_length=cfg.max_length,
        examples_per_shard=cfg.examples_per_shard,
        vocab_rows=vocab_rows,
    )
    done = writer.done_keys()
    todo = [ex for ex in examples if ex.key not in done]
    if len(todo) < len(examples):
        console.print(f"cache-teacher: resuming, {len(examples) - len(todo)} examples already cached, "
                      f"{len(todo)} to go")
    if token_stats["truncated"]:
        console.print(f"[yellow]cache-teacher: {token_stats['truncated']} examples truncated to "
                      f"max_length={cfg.max_length}[/]")

    start = time.perf_counter()
    input_tokens = cached_now = 0
    if todo:
        loaded = load_model(cfg.teacher, device=cfg.models.device, dtype=cfg.models.dtype,
                            trust_remote_code=cfg.models.trust_remote_code)
        with progress_bar("cache teacher", len(todo)) as advance:
            for rows, n_tokens in teacher_topk(loaded.model, todo, top_k=cfg.top_k, tail_samples=tail_samples,
                                               vocab_rows=vocab_rows, pad_token_id=loaded.tokenizer.pad_token_id, max_tokens=cfg.max_tokens):
                for ex, ids, lps in rows:
                    writer.add(ex.key, ids, lps)
                    cached_now += ids.shape[0]
                input_tokens += n_tokens
                advance(len(rows), n_tokens)
        del loaded
    writer.close()
    seconds = time.perf_counter() - start

    stats = writer.stats()
    summary = {
        "cache": str(run_dir),
        "examples": stats["examples"],
        "tokens": stats["tokens"],
        "bytes": stats["bytes"],
        "bytes_per_token": round(stats["bytes"] / stats["tokens"], 2) if stats["tokens"] else None,
        "payload_bytes_per_token": writer.meta["bytes_per_token"],
        "shards": stats["shards"],
        "k": cfg.top_k,
        "tail_samples": tail_samples,
        "vocab_rows": vocab_rows,
        "encoding": writer.meta["encoding"],
        "teacher": writer.meta["teacher"],
        "examples_now": len(todo),
        "resumed": len(examples) - len(todo),
        "tokens_now": cached_now,
        "seconds": round(seconds, 2),
        "teacher_tokens_per_s": round(input_tokens / seconds, 1) if todo and seconds > 0 else None,
        "tokenize": token_stats,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
