"""`teacherfit cache-teacher`: run the teacher once, store its top-k next-token log-probs for training.

The cache holds one row of ``top_k`` columns per loss position (t with ``labels[t + 1] != -100``) of every
training example: the teacher's ``top_k - top_k // 4`` most likely next tokens, then ``top_k // 4`` draws
from the rest of its distribution, which keep the KL unbiased (no draws when ``top_k`` covers the
vocabulary). ``teacherfit distill`` with ``teacher_cache`` then reads it and never loads the teacher.
Storage format, the tail draws and the measured accuracy: ``teacherfit.distill.cache``.

Resumable like `generate`: shards and the index are written atomically, and the index lists only complete
shards, so a run killed at any instant and restarted with the same output folder skips the examples in
listed shards and recomputes the rest; every example ends up cached exactly once.

Launched as several processes (``accelerate launch -m teacherfit cache-teacher`` or torchrun; ``teacherfit.launch``),
the examples still to cache are split between them, and the result is the one-process cache, row for row (the
tail draws are seeded per example, not per process). The main process makes and locks the folder, lists in the
index what earlier runs left (``merge_parts``) and decides what is to cache; process r takes every world-th of
those examples, from the longest on (shares of about the same tokens), with its own copy of the teacher on its
own device (cuda:LOCAL_RANK, or the CPU), and writes them with its own writer into its part,
``parts/rank-<r>/`` (shards and an index, the same atomic steps as above). Once every process is done, the main
process lists the parts' new shards in the cache's index, as ``parts/rank-<r>/shard-NNNNN.safetensors``, which
the reader opens like any shard; only it writes the index and ``summary.json`` (the counts of every process).
Every run starts with that merge, so the shards a killed run's processes completed count as cached whatever the
number of processes now, and those they did not complete are recomputed. A part's index stays after the merge:
it numbers that process's next shards past the ones the cache lists.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from teacherfit.config import CacheTeacherConfig, prepare_run_dir
from teacherfit.distill.cache import (
    CACHE_FORMAT,
    INDEX_NAME,
    CacheError,
    TopKCacheWriter,
    default_tail_samples,
    tail_uniforms,
    tokenizer_digest,
    topk_with_tail_draws,
)
from teacherfit.distill.examples import TrainExample, tokenize_records, training_records
from teacherfit.launch import Processes, launched_processes, quiet, start_processes
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
PARTS = "parts"  # the processes' parts of a sharded run: PARTS/rank-<r>/


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


def part_dir(run_dir: Path, rank: int) -> Path:
    """Where process ``rank`` of a sharded run writes its shards and their index (a cache of its share)."""
    return run_dir / PARTS / f"rank-{rank}"


def _listed(folder: Path) -> list[dict]:
    """The shard entries of ``folder``'s index (none without an index); the writer has checked it."""
    path = folder / INDEX_NAME
    return list(json.loads(path.read_text())["shards"]) if path.exists() else []


def merge_parts(run_dir: Path, writer_kwargs: dict) -> int:
    """List in the cache's index every shard that the processes of sharded runs completed in their parts and that
    it does not list yet; write the index (also an empty one) when there is none. Returns the shards added.

    The main process runs it while no other process writes: when a run starts, so that what the processes of a
    killed run completed counts as cached, and after the processes of this run are done. One index write
    (atomic) lists the new shards, so a kill leaves the old index or the new one, never a part of it. Refuses
    parts made with other settings, and a merge that would list an example twice.
    """
    main = TopKCacheWriter(run_dir, **writer_kwargs)  # refuses a cache made with other settings
    shards, keys = _listed(run_dir), main.done_keys()
    listed = {s["file"] for s in shards}
    parts = [p for p in (run_dir / PARTS).glob("rank-*") if p.name.removeprefix("rank-").isdigit()]
    added = []
    for part in sorted(parts, key=lambda p: int(p.name.removeprefix("rank-"))):
        if not (part / INDEX_NAME).exists():
            continue  # its process was killed before it completed a shard
        keys |= TopKCacheWriter(part, **writer_kwargs).done_keys()  # the same settings; its listed shards exist
        for shard in _listed(part):
            entry = dict(shard, file=f"{PARTS}/{part.name}/{shard['file']}")  # a path the reader opens as it is
            if entry["file"] not in listed:
                added.append(entry)
    merged = shards + added
    if sum(s["examples"] for s in merged) != len(keys):
        raise CacheError(f"{run_dir}: a shard in {PARTS}/ holds an example that the cache or another part holds "
                         "already (did two runs write this folder at once?); not merged: rebuild the cache in a new "
                         "folder")
    if added or not (run_dir / INDEX_NAME).exists():
        atomic_write_json(run_dir / INDEX_NAME, {"format": CACHE_FORMAT, "meta": main.meta, "shards": merged})
    return len(added)


def _keys_digest(examples: Sequence[TrainExample]) -> str:
    return hashlib.sha256("\n".join(ex.key for ex in examples).encode()).hexdigest()


def run_cache_teacher(cfg: CacheTeacherConfig) -> dict:
    """Cache the teacher's rows of every training example not cached yet; returns the summary (summary.json).

    Launched as several processes, each computes its share into its part and the main process merges them
    (module docstring); only the main process prints the run's lines and returns the summary, the others return
    ``{"cache", "process", "examples_now"}``.
    """
    procs = start_processes(cfg.models) if launched_processes() > 1 else Processes()
    try:
        return _cache_teacher(cfg, procs)
    finally:
        procs.close()


def _cache_teacher(cfg: CacheTeacherConfig, procs: Processes) -> dict:
    with procs.main_first(), quiet(not procs.main):  # downloads and GGUF metadata: the main process first
        records = training_records(cfg.data)
        tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.models.trust_remote_code)
        examples, token_stats = tokenize_records(records, tokenizer, cfg.max_length)
        vocab_rows = cached_rows(tokenizer, teacher_vocab(cfg))
    if cfg.top_k > vocab_rows:
        raise ValueError(f"top_k={cfg.top_k} exceeds the teacher's vocabulary ({vocab_rows} tokens): lower top_k")
    tail_samples = default_tail_samples(cfg.top_k, vocab_rows)
    plan = writer = None
    if procs.main:  # one process makes and locks the folder, lists what earlier runs left, decides what is to do
        run_dir = prepare_run_dir(cfg, "cache-teacher")  # the inputs hold up: the run starts here
        kwargs = {"top_k": cfg.top_k, "tail_samples": tail_samples, "teacher_provenance": teacher_identity(cfg),
                  "tokenizer_digest": tokenizer_digest(tokenizer), "max_length": cfg.max_length,
                  "examples_per_shard": cfg.examples_per_shard, "vocab_rows": vocab_rows}
        merge_parts(run_dir, kwargs)
        writer = TopKCacheWriter(run_dir, **kwargs)
        done = writer.done_keys()
        plan = (run_dir, kwargs, _keys_digest(examples), [i for i, ex in enumerate(examples) if ex.key not in done])
    run_dir, kwargs, digest, todo_at = procs.from_main(plan)
    if digest != _keys_digest(examples):  # the processes split the examples by position: the same ones, each
        raise ValueError("the training data changed while the processes of this run read it; run cache-teacher again")
    todo = [examples[i] for i in todo_at]
    if procs.main:
        before = writer.stats()
        if len(todo) < len(examples):
            console.print(f"cache-teacher: resuming, {len(examples) - len(todo)} examples already cached, "
                          f"{len(todo)} to go")
        if token_stats["truncated"]:
            console.print(f"[yellow]cache-teacher: {token_stats['truncated']} examples truncated to "
                          f"max_length={cfg.max_length}[/]")
    mine, label = todo, "cache teacher"
    if procs.world > 1:
        # every world-th from the longest on: shares of about the same tokens (the teacher's cost)
        by_length = sorted(todo, key=lambda ex: len(ex.tokens.input_ids), reverse=True)
        mine, label = by_length[procs.rank :: procs.world], f"cache teacher (process {procs.rank})"
        console.print(f"process {procs.rank} of {procs.world}: {len(mine)} of {len(todo)} examples to cache",
                      highlight=False)
        writer = TopKCacheWriter(part_dir(run_dir, procs.rank), **kwargs) if mine else None

    start = time.perf_counter()
    if mine:
        loaded = load_model(cfg.teacher, device=procs.device or cfg.models.device, dtype=cfg.models.dtype,
                            trust_remote_code=cfg.models.trust_remote_code)
        with progress_bar(label, len(mine)) as advance:
            for rows, n_tokens in teacher_topk(loaded.model, mine, top_k=cfg.top_k, tail_samples=tail_samples,
                                               vocab_rows=vocab_rows, pad_token_id=loaded.tokenizer.pad_token_id,
                                               max_tokens=cfg.max_tokens):
                for ex, ids, lps in rows:
                    writer.add(ex.key, ids, lps)
                advance(len(rows), n_tokens)
        del loaded
        writer.close()  # a part's last shard and its index
    if procs.world > 1:
        procs.barrier()  # every process's shards are listed in its part
        if not procs.main:
            return {"cache": str(run_dir), "process": procs.rank, "examples_now": len(mine)}
        merge_parts(run_dir, kwargs)
        writer = TopKCacheWriter(run_dir, **kwargs)
    writer.close()  # the index of a cache with no examples
    seconds = time.perf_counter() - start

    stats = writer.stats()
    input_tokens = sum(len(ex.tokens.input_ids) for ex in todo)  # the teacher's tokens, over every process
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
        "processes": procs.world,
        "examples_now": len(todo),
        "resumed": len(examples) - len(todo),
        "tokens_now": stats["tokens"] - before["tokens"],
        "seconds": round(seconds, 2),
        "teacher_tokens_per_s": round(input_tokens / seconds, 1) if todo and seconds > 0 else None,
        "tokenize": token_stats,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
