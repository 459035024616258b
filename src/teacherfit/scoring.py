"""Batched log-likelihood scoring of response tokens (backends layer).

This is the compute behind CAR's compatibility term L(D, theta), perplexity and IFD: the mean negative
log-likelihood of the labelled (response) tokens of each example under a frozen causal LM.

Why not ``model(input_ids, labels=...)``: that materialises logits for every position of the batch
(batch x length x vocab in fp32; 2 GB for 8 x 256 tokens of a 262k-vocabulary model) and averages over
the batch. We run the decoder once, keep the hidden states of labelled positions only, and apply the LM
head to them in chunks, so memory is bounded by ``head_chunk x vocab`` and no FLOPs go to prompt logits.
Batches are length-sorted under a token budget so padding waste stays small.

Applying the head ourselves means applying what the architecture does after it too (Granite divides the
logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``, Gemma 2 soft-caps them): that is
``PostHead``, read from the config by ``post_head_of`` and checked once per model against the model's own
forward (``head_transform``), so a family with a transform not listed here is refused rather than scored
wrong. Every path that applies a head itself (scoring, the judge reward, the teacher cache, the KD losses)
goes through it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from teacherfit.data import TokenizedExample


@dataclass
class ScoredExample:
    """Sum and mean negative log-likelihood (nats) of one example's labelled tokens."""

    nll_sum: float
    n_tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else float("nan")


def length_sorted_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group indices (longest first) so that padded size ``len(batch) * longest`` stays within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (ids, attention_mask), padded on the right (scoring) or left (generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


class UnsupportedHead(ValueError):
    """The model changes its logits after the LM head in a way teacherfit does not reproduce."""


@dataclass(frozen=True)
class PostHead:
    """What an architecture does to its LM head's output before the softmax: ``z * scale``, then soft-capping
    ``tanh(z / softcap) * softcap``. Applied to fp32 logits; elementwise, so it commutes with cutting rows."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model_type (of the class whose forward runs) -> (config attribute, divide?): every family of the installed
# transformers that rescales the logits after the head (or, MiniCPM3, the hidden states right before a
# bias-free head, which is the same). Read from the text config, so the multimodal wrappers are covered.
_GRANITE = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
            "granite4_vision", "granite_docling")
_LOGIT_SCALES: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(_GRANITE + ("minicpm3",), ("logits_scaling", True)),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), ("logits_scaling", False)),  # muP: multiplies
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
                    ("logit_scale", False)),
    "falcon_h1": ("lm_head_multiplier", False),
    **dict.fromkeys(("muse_spark", "muse_glimmer"), ("output_multiplier", False)),  # then the soft-cap
    **dict.fromkeys(("inkling", "inkling_text"), ("logits_mup_width_multiplier", True)),  # hidden / m
}
# final-logit soft-capping (Gemma 2/3/4, VaultGemma, nanochat, Inkling 2, ...), RecurrentGemma, xLSTM
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def text_config(config):
    """The language model's part of a config (a multimodal wrapper's ``text_config``; the config itself otherwise):
    the one place that asks, for every reader of heads, layers, context or soft caps."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def post_head_of(model_or_config) -> PostHead:
    """The post-head transform of a model (or of its config, e.g. for checks before any weights are read)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    text = text_config(cfg)
    scale = 1.0
    rule = _LOGIT_SCALES.get(getattr(cfg, "model_type", None))
    if rule is not None:
        value = getattr(text, rule[0], None)
        value = getattr(cfg, rule[0], None) if value is None else value
        if value is not None:
            scale = 1.0 / float(value) if rule[1] else float(value)
    caps = [getattr(text, name, None) for name in _SOFTCAP_ATTRS]
    return PostHead(scale, next((float(c) for c in caps if c), None))


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PROBE_TOKENS = 8


def head_transform(model) -> PostHead:
    """``post_head_of(model)``, checked once per model object against the model's own logits.

    The check runs the decoder and the full model on ``PROBE_TOKENS`` token ids (eval mode, no cache) and
    compares ``log_softmax(post(head(hidden)))`` with ``log_softmax(model(ids).logits)``. A family that
    transforms its logits in a way not listed here (or slices them, or puts a non-linear block between the
    decoder and the head) is refused with ``UnsupportedHead``: its scores and KD targets would be wrong. The
    tolerance follows the head's precision, so a transform too small to change log-probabilities beyond
    rounding on these tokens is not one that matters.
    """
    try:
        return _CHECKED[model]
    except (KeyError, TypeError):
        pass
    post = post_head_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    head = model.get_output_embeddings()
    rows = head.weight.shape[0] if getattr(head, "weight", None) is not None else PROBE_TOKENS + 3
    if rows == 0:  # partitioned weights (DeepSpeed ZeRO-3): no forward can run here; trust the config's rule
        return post
    device = next(model.parameters()).device
    ids = ((torch.arange(PROBE_TOKENS) * 7 + 3) % rows).unsqueeze(0).to(device)
    mask = torch.ones_like(ids)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            ours = post(head(hidden).float())
            theirs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        model.train(training)
    name = f"{type(base).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    if ours.shape != theirs.shape:
        raise UnsupportedHead(
            f"{name}: its forward gives {theirs.shape[-1]} logits per token but its output head has "
            f"{ours.shape[-1]} rows (the model reshapes or slices its logits after the head); teacherfit cannot "
            "apply this head itself: use a model of another family")
    ours, theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    # non-finite weights (a diverged model) are the training loop's to report: compare where both are finite
    finite = torch.isfinite(ours) & torch.isfinite(theirs)
    err = float((ours - theirs)[finite].abs().max()) if finite.any() else 0.0
    err = err if torch.equal(finite, torch.isfinite(ours) | torch.isfinite(theirs)) else math.inf
    scale = float(theirs[finite].abs().max()) if finite.any() else 1.0
    tol = (1e-4 if head_dtype(head) == torch.float32 else 2**-6) * max(1.0, scale)
    if err > tol:
        raise UnsupportedHead(
            f"{name}: its logits differ from its output head's by up to {err:.3g} in log-probability after "
            f"teacherfit's post-head transform ({post}): the architecture changes the logits after the LM head "
            "in a way teacherfit does not know, so scores and KD targets would be wrong; use a model of another "
            "family, or add the transform to teacherfit.scoring.post_head_of")
    try:
        _CHECKED[model] = post
    except TypeError:
        pass
    return post



def active_post_head(model) -> PostHead | None:
    """``head_transform(model)`` for the KD losses: None when the transform is the identity (nothing to apply)."""
    post = head_transform(model)
    return None if post.identity else post

def head_dtype(head) -> torch.dtype:
    weight = getattr(head, "weight", None)
    return weight.dtype if weight is not None else next(head.parameters()).dtype


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits (fp32) from final hidden states: its output head, then its post-head transform."""
    return head_transform(model)(model.get_output_embeddings()(hidden).float())


@torch.inference_mode()
def score_examples(
    model,
    examples: Sequence[TokenizedExample],
    *,
    pad_token_id: int,
    max_tokens: int = 4096,
    max_batch: int = 32,
    head_chunk: int = 512,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[ScoredExample]:
    """Score every example's labelled tokens; results come back in input order.

    ``on_batch(rows, tokens)`` is called after each batch (for progress bars).
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    results: list[ScoredExample | None] = [None] * len(examples)
    lengths = [len(ex.input_ids) for ex in examples]
    for batch in length_sorted_batches(lengths, max_tokens=max_tokens, max_batch=max_batch):
        # right padding: positions stay 0..n-1 without position_ids
        ids, mask = pad_batch([examples[i].input_ids for i in batch], pad_token_id)
        labels, _ = pad_batch([examples[i].labels for i in batch], -100)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # position t predicts token t+1: keep hidden states whose *next* token is labelled
        targets = labels[:, 1:]
        keep = targets != -100
        rows_of = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(targets)[keep]
        h = hidden[:, :-1][keep]
        t = targets[keep]
        nll = torch.empty(t.shape[0], dtype=torch.float32, device=device)
        for s in range(0, t.shape[0], head_chunk):
            rows = h[s : s + head_chunk]
            # BLAS takes other kernels (other summation orders) for a few rows than for many: padded to a multiple
            # of 64 rows, a token's logits do not depend on how many tokens share its chunk (batch invariance)
            fill = -len(rows) % 64
            logits = lm_head_logits(model, torch.cat([rows, rows.new_zeros(fill, rows.shape[1])]) if fill else rows)
            nll[s : s + head_chunk] = F.cross_entropy(logits[: len(rows)].float(), t[s : s + head_chunk], reduction="none")
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows_of, nll.double())
        counts = torch.bincount(rows_of, minlength=len(batch))
        for row, i in enumerate(batch):
            results[i] = ScoredExample(float(sums[row]), int(counts[row]))
        if on_batch:
            on_batch(len(batch), int(mask.sum()))
    return results  # type: ignore[return-value]


# ------------------------------------------------------------- batch-invariant scores (one process or several)

def padded_width(n: int, cap: int | None = None) -> int:
    """The width a sequence of ``n`` tokens is padded to when it is scored: a function of ``n`` alone (and of the
    model's context ``cap``), never of the other rows of its batch.

    Why: attention kernels (PyTorch's CPU flash SDPA, and the products whose sums run over the key positions)
    accumulate over the batch's padded width, so padding a row to another width moves its logits by a few ulps
    per layer; through a 30-layer model in fp32 that is up to ~4e-6 in a response's mean loss, enough for a score
    to depend on which rows were scored with it (one process or several, a fresh run or a resumed one). Padded
    to its own width and batched only with rows of that width, a row's hidden states are the same in any batch
    (measured bit-identical in fp32 on CPU); what a batch can still change is the output head's product when it
    has only a few rows (BLAS picks other kernels for them), which the judge below avoids.
    Widths are multiples of 64, and of a quarter of the power of two below ``n`` for longer rows (<= 25% padding).
    """
    if n <= 0:
        return 0
    step = max(64, (1 << (n.bit_length() - 1)) // 4)
    width = -(-n // step) * step
    return max(n, min(width, cap)) if cap else width


def padded_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int,
                   cap: int | None = None) -> list[tuple[int, list[int]]]:
    """``(width, indices)`` batches: rows of one ``padded_width`` each (widest first), within the token budget."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(padded_width(n, cap), []).append(i)
    out = []
    for width in sorted(groups, reverse=True):
        rows = groups[width]
        out += [(width, [rows[k] for k in batch])
                for batch in length_sorted_batches([width] * len(rows), max_tokens=max_tokens, max_batch=max_batch)]
    return out


def pad_to_width(seqs: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pad_batch`` (right padding) to exactly ``width`` columns (at least the longest row)."""
    ids, mask = pad_batch(seqs, pad_id)
    extra = width - ids.shape[1]
    if extra > 0:
        ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), pad_id)], 1)
        mask = torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], 1)
    return ids, mask


def context_of(model) -> int | None:
    """The longest input a model's positions allow (None when its config does not say)."""
    cfg = model.config
    text = text_config(cfg)
    return getattr(text, "max_position_embeddings", None) or getattr(cfg, "max_position_embeddings", None)


def score_padded(model, examples: list, *, pad_token_id: int, cap: int | None = None, **kw) -> list:
    """``score_examples`` with every example at its own ``padded_width``, scored only with
    examples of that width: its loss does not depend on the rows scored with it (so one process or several, a
    fresh run or a resumed one give the same scores to ~1e-7 in fp32; see ``padded_width`` for why).

    The width is reached with trailing pad tokens that are labelled -100: the model is causal, so they change no
    earlier position, and every row of a batch then has the batch's width."""
    from dataclasses import replace

    groups: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(padded_width(len(ex.input_ids), cap), []).append(i)
    out: list = [None] * len(examples)
    for width in sorted(groups, reverse=True):
        rows = groups[width]
        wide = [replace(ex, input_ids=list(ex.input_ids) + [pad_token_id] * (width - len(ex.input_ids)),
                        labels=list(ex.labels) + [-100] * (width - len(ex.labels)))
                for ex in (examples[i] for i in rows)]
        for i, scored in zip(rows, score_examples(model, wide, pad_token_id=pad_token_id, **kw)):
            out[i] = scored
    return out


class GradientSketch:
    """Per-example gradients of a model's trainable weights, projected to ``dim`` numbers (for GRACE).

    The projection is a CountSketch (sparse Johnson-Lindenstrauss: every weight adds its gradient, with a random
    sign, to one of ``dim`` random buckets), not the authors' dense Rademacher matrix (trak's CUDA projector):
    a dense ``dim x weights`` matrix does not fit in memory for a 100M-weight student and cannot be regenerated per
    example on a CPU, while the sketch costs one scatter-add per weight and 4 bytes per weight of index, made once
    from ``seed``. Both preserve inner products in expectation (so the second moments GRACE compares); the sketch
    needs no ``1/sqrt(weights)`` rescaling, as it preserves lengths in expectation. Written here because no kept
    library projects gradients (trak needs CUDA and is not a dependency).

    ``project(example)``: the gradient of the mean token loss over the example's labelled tokens (the model's own
    loss, as the authors' code), one example per backward pass.
    """

    def __init__(self, model, dim: int, seed: int = 0):
        self.model, self.dim = model, dim
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable weights to take gradients of")
        # one int32 index per weight: bucket b in [0, dim) adds the gradient, b + dim subtracts it
        self.buckets = []
        for k, p in enumerate(self.params):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
            self.buckets.append(torch.randint(0, 2 * dim, (p.numel(),), generator=gen, dtype=torch.int32).to(p.device))
        self.n_weights = sum(p.numel() for p in self.params)

    def project(self, input_ids: Sequence[int], labels: Sequence[int]) -> list[float]:
        device = self.params[0].device
        ids = torch.tensor([list(input_ids)], device=device)
        lab = torch.tensor([list(labels)], device=device)
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.model(input_ids=ids, labels=lab).loss
            loss.backward()
        out = torch.zeros(2 * self.dim, dtype=torch.float32, device=device)
        for p, idx in zip(self.params, self.buckets):
            if p.grad is not None:
                out.index_add_(0, idx, p.grad.reshape(-1).float())
        self.model.zero_grad(set_to_none=True)
        return (out[: self.dim] - out[self.dim :]).tolist()
