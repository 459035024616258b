"""Offline teacher cache: the teacher's top-k next-token log-probabilities, stored once, read by training.

`teacherfit cache-teacher` runs the teacher once over the training examples and stores, for every loss
position, K token ids with their log-probabilities: the teacher's K - S most likely tokens, then S tokens
drawn from the rest of its distribution (the tail). Distillation then reads the cache and never loads the
teacher (``chunked_head_losses(teacher_topk=cache.collate(...), divergence_kwargs=cache.loss_kwargs())``).

**Which positions.** Exactly those the KD loss uses: position t of an example, whose hidden state predicts
token t + 1, is cached when ``labels[t + 1] != -100``, i.e. where the shifted labels ``labels[1:]`` are
not ignored. Rows are stored in position order, so ``TopKCache.collate`` puts them back by filling the
non-ignored places of the shifted labels in order, and refuses a batch whose count of loss positions
differs from the cached count (another tokenizer, chat template or ``max_length``).

**The missing tail.** Top-k alone cannot reach 1% accuracy at this size. ``forward_kl_topk``'s default
(``tail="bucket"``) lumps the teacher's mass outside the top K into one outcome matched by the student's
mass outside the same ids: the exact KL between those coarsened distributions, a lower bound that misses
``P_tail * KL(teacher tail || student tail)``. Measured on the packaged pair it is 4.3% below the full KL
at K = 32 and still 2.5% below at K = 64 (384 bytes per token), whatever the stored dtype: the
truncation, not the rounding, is the error. So the last S = K // 4 columns of each row are independent
draws from the teacher's tail (its distribution over the tokens outside the first K - S ids,
renormalised; with replacement, so ids may repeat), stored with their true log-probabilities, and the
loss is called with ``tail_samples=S`` (``TopKCache.loss_kwargs()``): each draw stands for 1/S of the tail
mass ``P = 1 - sum of the top K - S probabilities``, which makes the KL value and its gradient unbiased
at tau = 1. The draws are reproducible: uniforms from a generator seeded by ``sha256(seed:example key)``,
one call per example, so resuming or re-batching draws the same tokens. The tail mass P itself is exact:
each row also stores ``log sum p`` of its top K - S entries in fp32, and the reader shifts the row's fp16
log-probs by one constant so that their log-sum-exp matches it (fp16 log-probs alone put an error of up
to ~1e-4 on P, the size of many real tails); each log-prob moves by at most its own rounding.

**Size and accuracy** (``benchmarks/bench_topk_cache.py``: teacher qwen2.5-coder-1.5b-instruct, student
qwen2.5-coder-0.5b-instruct, 8 quickstart responses, 1,363 response tokens, full KL 0.364 nats/token).
The default, K = 32 (24 top + 8 tail draws) with int32 ids, fp16 log-probs and the fp32 top mass, takes
196 bytes per cached token (197 on disk with headers and keys) and gives the full-vocabulary forward KL
to within 0.39% over ten sampling seeds (mean +0.01%, sd 0.18%), against -4.3% for 32 top entries with
the bucket. The stored dtype hardly matters next to the tail treatment (fp32 and fp16 log-probs agree to
0.003% of the KL); the 4-byte top mass is kept because each draw's weight is P / S, and fp16 log-probs
alone leave P with an error that is large relative to the small tails of confident positions. Token ids
need 18 bits (vocabularies of 151,936 and 262,144): int32. A cache written with ``tail_samples=0`` holds
plain top-K rows, read with the bucket.

**Vocabulary.** Rows are over the tokenizer's ids only (``vocab_rows`` in the meta, ``min(len(tokenizer), head
rows)``): a head padded past its tokenizer (Qwen2.5-7B: 152,064 rows for 151,936 tokens) gives its padded rows
no mass and no tail draws, whose ids would index past a student head of the tokenizer's size.
``TopKCache.check_compatible`` refuses a cache whose rows the student's tokenizer or head do not cover.

**Layout.** A cache is a folder: ``index.json`` (format, meta, the list of complete shards) and
``shard-NNNNN.safetensors`` files, each holding whole examples: ``ids`` [rows, K] int32, ``logprobs``
[rows, K] (fp16 by default) and ``topk_logsumexp`` [rows] fp32, with the examples' keys and row counts in
the safetensors metadata. A shard is written atomically, then the index atomically; a shard file that the
index does not list (a run killed between the two writes) is ignored and overwritten on resume, and
examples buffered but not flushed are simply recomputed. Readers memory-map shards (``safe_open``) and
read only the rows asked for, keeping a few shards open.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from teacherfit.store import atomic_write_bytes, atomic_write_json

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "INDEX_NAME",
    "CacheError",
    "CacheMismatchError",
    "Encoding",
    "TopKCache",
    "TopKCacheWriter",
    "default_tail_samples",
    "tail_uniforms",
    "tokenizer_digest",
    "topk_with_tail_draws",
]

CACHE_FORMAT = "teacherfit-topk-v1"
INDEX_NAME = "index.json"
IGNORE_INDEX = -100


class CacheError(ValueError):
    """A cache folder is missing, damaged, or not the cache this run needs; the message says what to do."""


class CacheMismatchError(CacheError):
    """The cache was made for other token sequences (tokenizer, chat template or max_length differ)."""


# ---------------------------------------------------------------- encodings


@dataclass(frozen=True)
class Encoding:
    """How one cached position is stored: K int32 ids, K log-probs, optionally the fp32 log top-k mass."""

    name: str
    logprobs_dtype: torch.dtype
    stores_logsumexp: bool

    def bytes_per_token(self, k: int) -> int:
        return k * (4 + self.logprobs_dtype.itemsize) + (4 if self.stores_logsumexp else 0)


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("int32-fp32", torch.float32, False),
        Encoding("int32-fp16", torch.float16, False),
        Encoding("int32-fp16-lse", torch.float16, True),
        Encoding("int32-bf16-lse", torch.bfloat16, True),
    )
}
"""Stored forms the writer accepts (``benchmarks/bench_topk_cache.py`` compares them)."""

DEFAULT_ENCODING = "int32-fp16-lse"


def _decode(encoding: Encoding, logprobs: Tensor, logsumexp: Tensor | None, n_top: int) -> Tensor:
    """fp32 log-probs from their stored form (see the module docstring for the log-sum-exp shift)."""
    lp = logprobs.float()
    if encoding.stores_logsumexp and lp.numel():
        shift = logsumexp.float() - torch.logsumexp(lp[:, :n_top], dim=-1)
        # Rows that are all padding (-inf) have no mass to restore.
        lp = lp + torch.where(torch.isfinite(shift), shift, 0.0).unsqueeze(-1)
    return lp


# ---------------------------------------------------------------- what is cached per position


def default_tail_samples(k: int, vocab: int) -> int:
    """How many of a row's K columns are tail draws: a quarter (24 + 8 at K = 32); none when K covers the vocabulary."""
    return k // 4 if k < vocab else 0


def tail_uniforms(key: str, n: int, samples: int, seed: int = 0) -> Tensor:
    """Uniforms [n, samples] for one example's tail draws, from a generator seeded by the example key.

    One call per example, so the draws do not depend on batching, order or resuming.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(n, samples, generator=generator)


def topk_with_tail_draws(
    logits: Tensor, *, k: int, tail_samples: int = 0, uniforms: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Cache rows from the teacher's fp32 logits [n, V]: ``(ids [n, K] int64, logprobs [n, K] fp32)``.

    Columns ``:K - S`` are the K - S most likely tokens (``topk(log_softmax(logits))``, computed as the
    top logits minus their log-sum-exp, without a second vocabulary-sized tensor); the last S columns are
    draws from the tail, by inverse CDF with ``uniforms`` [n, S] in [0, 1) (see ``tail_uniforms``).
    """
    if not 0 <= tail_samples <= k:
        raise ValueError(f"tail_samples must be in [0, k={k}], got {tail_samples}")
    if k > logits.shape[-1]:
        raise ValueError(f"k={k} exceeds the vocabulary ({logits.shape[-1]} tokens)")
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, ids = logits.topk(k - tail_samples, dim=-1)
    if not tail_samples:
        return ids, values - lse
    if uniforms is None or uniforms.shape != (logits.shape[0], tail_samples):
        raise ValueError(f"uniforms must be [n, tail_samples] = {(logits.shape[0], tail_samples)}")
    cdf = (logits - lse).exp_().scatter_(-1, ids, 0.0).cumsum_(-1)  # CDF of the tail (top ids carry 0)
    # The first token whose CDF exceeds u * (tail mass): zero-probability tokens (top ids) are never picked.
    target = uniforms.to(cdf) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_max_(logits.shape[-1] - 1)
    del cdf
    return torch.cat([ids, draws], dim=-1), torch.cat([values, logits.gather(-1, draws)], dim=-1) - lse


# ---------------------------------------------------------------- tokenizer digest

# Plain chats whose rendering and labels enter the digest (system turn, several turns, code, non-ASCII).
_PROBE_CHATS = (
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Add two numbers in Python."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
        {"role": "user", "content": "Et en français ?"},
        {"role": "assistant", "content": "Voilà : « a + b » — 42."},
    ],
)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what fixes the cached token sequences: vocabulary, special tokens and chat rendering.

    It hashes the vocabulary (sorted ``(token, id)`` items), the added tokens with their special flags,
    the BOS/EOS/UNK tokens, and the ids and response labels that ``tokenize_example`` (the function that
    tokenizes training examples) gives for a few fixed plain chats. The chat template enters through
    what it renders, not its source text: the packaged Qwen2.5-Coder 0.5B and 1.5B templates differ in
    their tool-calling branch only and render chats identically, so a cache made with one serves the
    other. The pad token is left out: padding never reaches a cached position, and ``load_model`` sets
    it to EOS where a tokenizer has none.
    """
    from teacherfit.data import tokenize_example

    probes: list[Any] = []
    for chat in _PROBE_CHATS:
        try:
            ex = tokenize_example(tokenizer, chat)
            probes.append([ex.input_ids, ex.labels])
        except Exception as err:  # noqa: BLE001 - deterministic for a given tokenizer: part of the digest
            probes.append(f"error: {type(err).__name__}: {err}")
    added = sorted(
        (int(i), tok.content, bool(tok.special)) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "added": added,
        "special": {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "unk_token")},
        "chat_probes": probes,
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- index and shards


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(
            f"{folder} is not a teacher cache (no {INDEX_NAME}); build one with `teacherfit cache-teacher`"
        ) from None
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise CacheError(f"{path}: format {got!r}, expected {CACHE_FORMAT!r}; rebuild the cache with this version")
    return index


def _shard_examples(path: Path) -> list[tuple[str, int]]:
    """``[(key, rows), ...]`` of one shard, from its safetensors header (no tensor data read)."""
    if not path.exists():
        raise CacheError(f"{path} is listed in the index but missing: the cache is incomplete, rebuild it")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CACHE_FORMAT or "examples" not in meta:
        raise CacheError(f"{path}: not a {CACHE_FORMAT} shard")
    return [(str(key), int(rows)) for key, rows in json.loads(meta["examples"])]


def _check_tensors(ids: Tensor, logprobs: Tensor, k: int) -> None:
    if ids.dim() != 2 or ids.shape != logprobs.shape or ids.shape[1] != k:
        raise ValueError(
            f"ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be [N, K] with K = {k}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise ValueError(f"logprobs must be a float tensor, got {logprobs.dtype}")


class TopKCacheWriter:
    """Appends examples' top-k rows to a cache folder, a shard at a time; resumes from the index on disk.

    Rows have ``top_k`` columns, of which the last ``tail_samples`` are tail draws
    (``topk_with_tail_draws``, seeded with ``sample_seed``); 0 stores plain top-K rows. ``add`` buffers an
    example; every ``examples_per_shard`` examples the buffer is written as one shard (``flush``), then
    the index. Re-opening a folder that already holds a cache continues it, after checking that its meta
    (K, tail draws, encoding, teacher, tokenizer digest, max_length, vocab rows) is the one asked for.
    ``vocab_rows`` is the vocabulary the rows are over (``len(tokenizer)`` for ``teacherfit cache-teacher``: the
    head's padded rows are cut off); ``TopKCache.check_compatible`` checks it against the student's.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        top_k: int,
        teacher_provenance: dict,
        tokenizer_digest: str,
        max_length: int,
        examples_per_shard: int,
        encoding: str = DEFAULT_ENCODING,
        tail_samples: int = 0,
        sample_seed: int = 0,
        vocab_rows: int | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 <= tail_samples <= top_k:
            raise ValueError(f"tail_samples must be in [0, top_k={top_k}], got {tail_samples}")
        if examples_per_shard < 1:
            raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.encoding = ENCODINGS[encoding]
        self.k = top_k
        self.n_top = top_k - tail_samples
        self.examples_per_shard = examples_per_shard
        self.meta = {
            "k": top_k,
            "tail_samples": tail_samples,
            "sample_seed": sample_seed,
            "encoding": encoding,
            "ids_dtype": "int32",
            "logprobs_dtype": str(self.encoding.logprobs_dtype).removeprefix("torch."),
            "stores_topk_logsumexp": self.encoding.stores_logsumexp,
            "bytes_per_token": self.encoding.bytes_per_token(top_k),
            "teacher": dict(teacher_provenance),
            "tokenizer_digest": tokenizer_digest,
            "max_length": max_length,
            "vocab_rows": vocab_rows,
            "positions": "t with labels[t + 1] != -100, in order; logprobs at temperature 1 over the first vocab_rows "
                         "rows of the head (the tokenizer's ids; padded rows left out)",
            "columns": f"{top_k - tail_samples} most likely tokens, then {tail_samples} draws from the rest "
                       "(with replacement, uniforms from sha256(sample_seed:key)); read with loss_kwargs()",
        }
        self._shards: list[dict] = []
        self._done: set[str] = set()
        self._buffer: list[tuple[str, Tensor, Tensor, Tensor | None]] = []
        if (self.out_dir / INDEX_NAME).exists():
            index = _read_index(self.out_dir)
            self._check_same_cache(index["meta"])
            self._shards = list(index["shards"])
            for shard in self._shards:
                self._done.update(key for key, _ in _shard_examples(self.out_dir / shard["file"]))

    def _check_same_cache(self, old: dict) -> None:
        diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
        if diff:
            lines = "\n".join(f"  {k}: cache has {old.get(k)!r}, this run {self.meta.get(k)!r}" for k in diff)
            raise CacheError(
                f"{self.out_dir} already holds a teacher cache made with other settings:\n{lines}\n"
                "Use another output folder, or run with the cache's settings to resume it."
            )

    def done_keys(self) -> set[str]:
        """Keys of the examples in complete shards on disk (buffered examples are not done yet)."""
        return set(self._done)

    def add(self, key: str, ids: Tensor, logprobs: Tensor) -> None:
        """Buffer one example's rows: ``ids`` [N, K] and ``logprobs`` [N, K] (fp32, temperature 1).

        With ``tail_samples`` S > 0 the last S columns must be tail draws (``topk_with_tail_draws``).
        """
        _check_tensors(ids, logprobs, self.k)
        if key in self._done or any(key == b[0] for b in self._buffer):
            raise ValueError(f"example {key!r} is already in the cache; refusing to add it twice")
        lp32 = logprobs.detach().float().cpu()
        lse = torch.logsumexp(lp32[:, : self.n_top], dim=-1) if self.encoding.stores_logsumexp else None
        self._buffer.append((key, ids.detach().cpu().to(torch.int32), lp32.to(self.encoding.logprobs_dtype), lse))
        if len(self._buffer) >= self.examples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered examples as one shard (atomically), then the index (atomically)."""
        if not self._buffer:
            return
        number = len(self._shards)
        name = _shard_name(number)
        tensors = {
            "ids": torch.cat([b[1] for b in self._buffer]).contiguous(),
            "logprobs": torch.cat([b[2] for b in self._buffer]).contiguous(),
        }
        if self.encoding.stores_logsumexp:
            tensors["topk_logsumexp"] = torch.cat([b[3] for b in self._buffer]).contiguous()
        examples = [[b[0], int(b[1].shape[0])] for b in self._buffer]
        data = safetensors_bytes(tensors, metadata={"format": CACHE_FORMAT, "examples": json.dumps(examples)})
        # The shard first: until the index lists it, a shard file is invisible and will be overwritten.
        atomic_write_bytes(self.out_dir / name, data)
        entry = {"file": name, "examples": len(examples), "tokens": int(tensors["ids"].shape[0]), "bytes": len(data)}
        shards = self._shards + [entry]
        atomic_write_json(self.out_dir / INDEX_NAME, {"format": CACHE_FORMAT, "meta": self.meta, "shards": shards})
        self._shards = shards
        self._done.update(key for key, _ in examples)
        self._buffer.clear()

    def close(self) -> None:
        """Flush what is buffered and make sure an index exists (also for a cache of zero examples)."""
        self.flush()
        if not (self.out_dir / INDEX_NAME).exists():
            atomic_write_json(self.out_dir / INDEX_NAME, {"format": CACHE_FORMAT, "meta": self.meta, "shards": []})

    def stats(self) -> dict:
        """Examples and tokens in complete shards; bytes on disk of those shards plus the index."""
        index = self.out_dir / INDEX_NAME
        return {
            "examples": sum(s["examples"] for s in self._shards),
            "tokens": sum(s["tokens"] for s in self._shards),
            "bytes": sum(s["bytes"] for s in self._shards) + (index.stat().st_size if index.exists() else 0),
            "shards": len(self._shards),
        }

    def __enter__(self) -> TopKCacheWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:  # after an error the buffer is dropped: those examples are recomputed on resume
            self.close()


class TopKCache:
    """Reads a cache folder written by ``TopKCacheWriter`` (``path`` is the folder or its index.json)."""

    def __init__(self, path: str | Path, *, max_open_shards: int = 8):
        path = Path(path)
        self.folder = path.parent if path.name == INDEX_NAME else path
        index = _read_index(self.folder)
        self.meta: dict = index["meta"]
        self.k: int = int(self.meta["k"])
        self.tail_samples: int = int(self.meta.get("tail_samples", 0))
        rows = self.meta.get("vocab_rows")
        self.vocab_rows: int | None = None if rows is None else int(rows)
        self.encoding = ENCODINGS.get(self.meta["encoding"])
        if self.encoding is None:
            raise CacheError(f"{self.folder}: unknown encoding {self.meta['encoding']!r}")
        self._files = [s["file"] for s in index["shards"]]
        self._rows: dict[str, tuple[int, int, int]] = {}  # key -> (shard, first row, end row)
        for number, name in enumerate(self._files):
            start = 0
            for key, rows in _shard_examples(self.folder / name):
                if key in self._rows:
                    raise CacheError(f"{self.folder}: example {key} is in two shards; the cache is damaged")
                self._rows[key] = (number, start, start + rows)
                start += rows
        self.tokens = sum(s["tokens"] for s in index["shards"])
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._max_open = max(1, max_open_shards)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def keys(self) -> list[str]:
        return list(self._rows)

    def loss_kwargs(self) -> dict:
        """What ``forward_kl_topk`` (or ``chunked_head_losses``'s ``divergence_kwargs``) needs to read these rows."""
        return {"tail_samples": self.tail_samples} if self.tail_samples else {}

    def check_compatible(self, tokenizer, max_length: int, *, student_rows: int | None = None) -> None:
        """Refuse a cache made for other token sequences or another vocabulary, before any training work.

        ``student_rows``: rows of the student's output head (from its config); every cached id must index one.
        """
        digest = tokenizer_digest(tokenizer)
        if digest != self.meta["tokenizer_digest"]:
            raise CacheMismatchError(
                f"the teacher cache {self.folder} was made with another tokenizer or chat template "
                f"(digest {self.meta['tokenizer_digest'][:12]}, the student's is {digest[:12]}): its token ids "
                "and positions do not line up with the student's; rebuild it with `teacherfit cache-teacher` "
                "using a teacher that shares the student's tokenizer"
            )
        if int(max_length) != int(self.meta["max_length"]):
            raise CacheMismatchError(
                f"the teacher cache {self.folder} was made with max_length={self.meta['max_length']}, training "
                f"uses {max_length}: truncated examples would not line up; use the same max_length or rebuild it"
            )
        if self.vocab_rows is None:
            raise CacheMismatchError(
                f"the teacher cache {self.folder} does not record the vocabulary its distributions are over "
                "(made by an older teacherfit, which may have kept the teacher head's padded rows): rebuild it "
                "with `teacherfit cache-teacher`")
        if self.vocab_rows > len(tokenizer):
            raise CacheMismatchError(
                f"the teacher cache {self.folder} holds distributions over {self.vocab_rows} token ids, the "
                f"student's tokenizer has {len(tokenizer)}: rebuild it with `teacherfit cache-teacher` and a "
                "teacher that shares the student's tokenizer")
        if student_rows is not None and student_rows < self.vocab_rows:
            raise CacheMismatchError(
                f"the student's output head has {student_rows} rows, fewer than the {self.vocab_rows} token ids "
                f"of the teacher cache {self.folder}: the student cannot predict every token of its tokenizer; "
                "use a student whose head covers its tokenizer")

    def _shard(self, number: int):
        handle = self._open.get(number)
        if handle is None:
            handle = safe_open(self.folder / self._files[number], framework="pt")
            self._open[number] = handle
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(number)
        return handle

    def get(self, key: str) -> tuple[Tensor, Tensor]:
        """``(ids [N, K] int64, logprobs [N, K] float32)`` of one example, read from its shard."""
        try:
            number, start, end = self._rows[key]
        except KeyError:
            raise KeyError(
                f"example {key!r} is not in the teacher cache {self.folder}: it was made from other "
                "training data; rebuild it with the same `data` settings"
            ) from None
        if start == end:
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k)
        f = self._shard(number)
        ids = f.get_slice("ids")[start:end].long()
        lse = f.get_slice("topk_logsumexp")[start:end] if self.encoding.stores_logsumexp else None
        return ids, _decode(self.encoding, f.get_slice("logprobs")[start:end], lse, self.k - self.tail_samples)

    def collate(
        self, keys: Sequence[str], labels_shifted: Tensor, *, ignore_index: int = IGNORE_INDEX
    ) -> tuple[Tensor, Tensor]:
        """Cached rows laid out like ``labels_shifted`` [B, T]: ``(ids [B, T, K] int64, logprobs [B, T, K] fp32)``.

        Row b's cached rows fill, in order, the places where ``labels_shifted[b] != ignore_index``; every
        other place gets id 0 and log-prob -inf (padding, never read by the loss). Tensors are on the
        device of ``labels_shifted``.
        """
        if labels_shifted.dim() != 2 or labels_shifted.shape[0] != len(keys):
            raise ValueError(
                f"labels_shifted must be [B, T] with B = len(keys) = {len(keys)}, got {tuple(labels_shifted.shape)}"
            )
        b, t = labels_shifted.shape
        mask = (labels_shifted != ignore_index).cpu()
        ids = torch.zeros(b, t, self.k, dtype=torch.long)
        logprobs = torch.full((b, t, self.k), float("-inf"))
        for row, key in enumerate(keys):
            r_ids, r_lps = self.get(key)
            n = int(mask[row].sum())
            if n != r_ids.shape[0]:
                raise CacheMismatchError(
                    f"example {key}: the batch has {n} loss positions but the teacher cache has {r_ids.shape[0]}. "
                    f"The cache was made with another tokenizer, chat template or max_length "
                    f"(cache: max_length={self.meta['max_length']}, tokenizer digest "
                    f"{self.meta['tokenizer_digest'][:12]}), or the labels are not shifted "
                    "(pass labels[:, 1:]); rebuild the cache with the student's tokenizer and max_length"
                )
            ids[row, mask[row]] = r_ids
            logprobs[row, mask[row]] = r_lps
        return ids.to(labels_shifted.device), logprobs.to(labels_shifted.device)

    def __getstate__(self) -> dict:  # open shard handles do not pickle (e.g. DataLoader workers)
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state
