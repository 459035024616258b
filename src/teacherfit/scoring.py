"""Batched log-likelihood scoring of response tokens (backends layer).

This is the compute behind CAR's compatibility term L(D, theta), perplexity and IFD: the mean negative
log-likelihood of the labelled (response) tokens of each example under a frozen causal LM.

Why not ``model(input_ids, labels=...)``: that materialises logits for every position of the batch
(batch x length x vocab in fp32; 2 GB for 8 x 256 tokens of a 262k-vocabulary model) and averages over
the batch. We run the decoder once, keep the hidden states of labelled positions only, and apply the LM
head to them in chunks, so memory is bounded by ``head_chunk x vocab`` and no FLOPs go to prompt logits.
Batches are length-sorted under a token budget so padding waste stays small.
"""

from __future__ import annotations

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


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's output head (and final logit soft-capping where the architecture has it)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # position t predicts token t+1: keep hidden states whose *next* token is labelled
        targets = labels[:, 1:]
        keep = targets != -100
        rows_of = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(targets)[keep]
        h = hidden[:, :-1][keep]
        t = targets[keep]
        nll = torch.empty(t.shape[0], dtype=torch.float32, device=device)
        for s in range(0, t.shape[0], head_chunk):
            logits = lm_head_logits(model, h[s : s + head_chunk]).float()
            nll[s : s + head_chunk] = F.cross_entropy(logits, t[s : s + head_chunk], reduction="none")
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows_of, nll.double())
        counts = torch.bincount(rows_of, minlength=len(batch))
        for row, i in enumerate(batch):
            results[i] = ScoredExample(float(sums[row]), int(counts[row]))
        if on_batch:
            on_batch(len(batch), int(mask.sum()))
    return results  # type: ignore[return-value]
