"""Distillation losses: pure torch functions, no model code (docs/papers.md section 2).

Conventions shared by every function here:

- **Alignment.** Logits are already aligned with labels: ``student_logits[..., t, :]`` is the
  prediction scored against ``labels[..., t]``. The caller shifts. Shapes are ``[B, T, V]`` with labels
  ``[B, T]``, or ``[N, V]`` with ``[N]``.
- **Mask.** Only tokens with ``labels != ignore_index`` count (the response tokens). Masked rows are
  selected *before* any vocabulary-sized work, so prompt tokens cost nothing.
- **Precision.** Inputs of any float dtype are upcast to fp32 inside; results are fp32.
- **Reduction.** The public divergences return a 0-dim mean over masked tokens. On an empty mask they
  return an exact 0 that is still attached to the graph (a sum over zero selected rows), so
  ``loss.backward()`` works and gives zero gradients, even when some logits are infinite.
- **Temperature.** Divergences compare ``p = softmax(z / tau)`` of both models and are multiplied by
  ``tau ** 2`` (Hinton et al.), which keeps gradient magnitudes comparable across temperatures; the
  exception is ``tvd``, a bounded distance in [0, 1] that is *not* rescaled. ``cross_entropy`` is always
  at tau = 1 on the raw logits.
- **Weights** (lambda, per-term weights) are applied by the caller, never inside a loss.
- The teacher is not detached here: pass teacher tensors produced under ``torch.no_grad()``.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIVERGENCES",
    "TOPK_TAIL_ATOL",
    "attention_kl",
    "attention_kl_sums",
    "chunked_head_losses",
    "linear_head_params",
    "cross_entropy",
    "forward_kl",
    "forward_kl_topk",
    "generalized_jsd",
    "reverse_kl",
    "sampled_token_terms",
    "skew_kl",
    "tvd",
]

TOPK_TAIL_ATOL: float = 1e-5
"""Teacher tail masses (1 - sum of cached top-k probabilities) at or below this are treated as 0.

Top-k log-probabilities cached in fp32 carry rounding of about 1e-7 per unit of entropy, so a tail below
this level is noise rather than mass outside the top-k (with K = V it is pure noise). Dropping it changes
the KL by at most about ``TOPK_TAIL_ATOL * log(TOPK_TAIL_ATOL / q_tail)``. Log-probabilities cached in
bf16 are far noisier (about 1e-2 on the tail): cache them in fp32.
"""

_FP32_MIN = torch.finfo(torch.float32).min


# ---------------------------------------------------------------- checks and selection


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_labels(logits: Tensor, labels: Tensor, name: str = "student_logits") -> None:
    if logits.dim() < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of {name} without its vocabulary dimension: "
            f"{name} {tuple(logits.shape)}, labels {tuple(labels.shape)} "
            "(expected [B, T, V] with [B, T], or [N, V] with [N])"
        )


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocabularies differ ({student_logits.shape[-1]} vs "
            f"{teacher_logits.shape[-1]} logits): align the vocabularies (same tokenizer, logits sliced "
            "to the shared vocabulary) before computing a divergence"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    _check_labels(student_logits, labels)


def _mean(per_token_sum: Tensor, n: int) -> Tensor:
    # With n == 0 the sum runs over zero rows: an exact 0 attached to the graph.
    return per_token_sum / max(n, 1)


# ---------------------------------------------------------------- per-token kernels
# Each takes fp32 logits [N, V] of already-selected tokens and returns per-token values [N].


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities, with 0 * log(0 / q) = 0.

    The log-ratio is zeroed where p == 0 *before* the product, so neither the forward value nor the
    gradient picks up inf * 0 (e.g. where both log-probabilities are -inf or underflow).
    """
    p = logp.exp()
    log_ratio = torch.where(p > 0, logp - logq, 0.0)
    return (p * log_ratio).sum(-1)


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q), computed in log space; 0 < w < 1."""
    # Clamping -inf to the fp32 minimum keeps logaddexp's gradient finite where both are -inf.
    logp = logp.clamp_min(_FP32_MIN)
    logq = logq.clamp_min(_FP32_MIN)
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def _forward_kl_tokens(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    return _kl_rows(t_logp, s_logp) * temperature**2


def _reverse_kl_tokens(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    return _kl_rows(s_logp, t_logp) * temperature**2


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta!r}")


def _generalized_jsd_tokens(s: Tensor, t: Tensor, temperature: float, beta: float = 0.5) -> Tensor:
    _check_beta(beta)
    if beta == 0.0:
        return _forward_kl_tokens(s, t, temperature)
    if beta == 1.0:
        return _reverse_kl_tokens(s, t, temperature)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    m_logp = _log_mix(t_logp, s_logp, beta)  # m = beta * p_T + (1 - beta) * p_S
    jsd = beta * _kl_rows(t_logp, m_logp) + (1.0 - beta) * _kl_rows(s_logp, m_logp)
    return jsd * temperature**2


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl: alpha must be in [0, 1), got {alpha!r}")


def _skew_kl_tokens(s: Tensor, t: Tensor, temperature: float, alpha: float = 0.1) -> Tensor:
    _check_alpha(alpha)
    if alpha == 0.0:
        return _forward_kl_tokens(s, t, temperature)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    m_logp = _log_mix(t_logp, s_logp, alpha)  # alpha * p_T + (1 - alpha) * p_S
    return _kl_rows(t_logp, m_logp) * temperature**2


def _tvd_tokens(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    s_p = F.softmax(s / temperature, dim=-1)
    t_p = F.softmax(t / temperature, dim=-1)
    return 0.5 * (t_p - s_p).abs().sum(-1)


_DIVERGENCE_TOKENS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": _forward_kl_tokens,
    "reverse_kl": _reverse_kl_tokens,
    "generalized_jsd": _generalized_jsd_tokens,
    "skew_kl": _skew_kl_tokens,
    "tvd": _tvd_tokens,
}


def _reduce_pair(kernel, student_logits, teacher_logits, labels, temperature, ignore_index, **kwargs):
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, labels)
    mask = labels != ignore_index
    s = student_logits[mask].float()
    t = teacher_logits[mask].float()
    return _mean(kernel(s, t, temperature, **kwargs).sum(), s.shape[0])


# ---------------------------------------------------------------- full-vocabulary divergences


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """``tau^2 * mean_t KL(p_T || p_S)`` with ``p = softmax(z / tau)``: the paper's L_pred.

    Mass-covering: the student is pushed to put probability wherever the teacher does.
    """
    return _reduce_pair(_forward_kl_tokens, student_logits, teacher_logits, labels, temperature, ignore_index)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """``tau^2 * mean_t KL(p_S || p_T)``: mode-seeking (the student may drop teacher modes)."""
    return _reduce_pair(_reverse_kl_tokens, student_logits, teacher_logits, labels, temperature, ignore_index)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Generalised Jensen-Shannon divergence, ``tau^2 * mean_t JSD_beta``.

    ``m = beta * p_T + (1 - beta) * p_S`` (computed in log space with logaddexp) and
    ``JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``; symmetric in the two models at
    beta = 0.5. The end points follow TRL's GKD convention: ``beta = 0`` is ``forward_kl`` and
    ``beta = 1`` is ``reverse_kl``. They are definitions, not limits: the mixed formula itself tends to 0
    as beta approaches 0 or 1, so values near the end points are much smaller than at them.
    """
    _check_beta(beta)
    return _reduce_pair(
        _generalized_jsd_tokens, student_logits, teacher_logits, labels, temperature, ignore_index, beta=beta
    )


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Skew forward KL (DistiLLM): ``tau^2 * mean_t KL(p_T || alpha * p_T + (1 - alpha) * p_S)``.

    ``alpha`` in [0, 1); ``alpha = 0`` is ``forward_kl``. Mixing some teacher mass into the student side
    bounds the log-ratio by ``-log(alpha)``, which tames gradients where the student gives a teacher
    token almost no probability.
    """
    _check_alpha(alpha)
    return _reduce_pair(
        _skew_kl_tokens, student_logits, teacher_logits, labels, temperature, ignore_index, alpha=alpha
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Total variation distance ``mean_t 0.5 * sum_v |p_T - p_S|`` with ``p = softmax(z / tau)``.

    Not multiplied by ``tau^2``: TVD is a bounded distance in [0, 1] at every temperature.
    """
    return _reduce_pair(_tvd_tokens, student_logits, teacher_logits, labels, temperature, ignore_index)


def sampled_token_terms(student_logits: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sampled-token reverse KL of response tokens the student sampled itself: per token, the log-ratio
    ``r = log p_S(y) - log p_T(y)`` of the sampled token ``y`` (``labels``; ``teacher_logprobs`` = log p_T(y),
    aligned with them; NaN where the teacher gave none: r = 0 there), used as a policy-gradient advantage.

    Returns ``(value, surrogate)`` per token [N]: ``value`` = r, a one-sample estimate of KL(p_S || p_T) (its mean
    over tokens sampled from p_S is unbiased); ``surrogate`` has r's value and the gradient ``r * grad log p_S(y)``,
    the score-function gradient of KL(p_S || p_T) (``E[grad log p_S] = 0``), as the on-policy distillation recipes
    (Qwen3's strong-to-weak stage; per-token reverse KL as the advantage) use it. Temperature 1: the samples'.
    """
    logp = student_logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    teacher = teacher_logprobs.float()
    # a token the teacher did not score (NaN: a server that spelled the text otherwise) has no advantage
    ratio = torch.where(teacher.isnan(), torch.zeros_like(logp), logp - teacher).detach()
    return ratio, ratio * logp - (ratio * logp).detach() + ratio


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of the labels over masked tokens, in fp32, at tau = 1.

    The ground-truth term of ``(1 - lambda) * CE + lambda * KD``; the mix is the caller's.
    """
    _check_labels(student_logits, labels)
    mask = labels != ignore_index
    s = student_logits[mask].float()
    return _mean(F.cross_entropy(s, labels[mask], reduction="sum"), s.shape[0])


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
}
"""Full-vocabulary divergences by name, each ``(student_logits, teacher_logits, labels, *, ...)``."""


# ---------------------------------------------------------------- top-k teacher


def _forward_kl_sampled_tail_tokens(s: Tensor, ids: Tensor, lp: Tensor, temperature: float, n_draws: int) -> Tensor:
    """Per-token forward KL: the first K - n_draws entries exact, the tail estimated from the last n_draws."""
    top, draws = lp[:, : lp.shape[-1] - n_draws], lp[:, lp.shape[-1] - n_draws :]
    t_tail = -torch.expm1(torch.logsumexp(top, dim=-1))  # exact tail mass at tau = 1 (no cancellation)
    t_tail = torch.where(t_tail > TOPK_TAIL_ATOL, t_tail, 0.0)
    inv = 1.0 / temperature
    # Unnormalised tempered weights: p^(1/tau) for top entries; each draw stands for tail / n_draws of the
    # tau = 1 mass, reweighted by p^(1/tau - 1) at other temperatures (self-normalised importance sampling).
    use = torch.isfinite(draws) & (t_tail > 0).unsqueeze(-1)
    draw_log_share = (t_tail / n_draws).clamp_min(1e-30).log().unsqueeze(-1)
    draw_w = torch.where(use, draw_log_share + draws * (inv - 1.0), float("-inf"))
    log_w = torch.cat([top * inv, draw_w], dim=-1)
    log_z = torch.logsumexp(log_w, dim=-1, keepdim=True)  # 0 at tau = 1: sum p_top + tail = 1
    w = (log_w - log_z).exp()
    t_logp = lp * inv - log_z  # the teacher's tempered log-prob of each entry's token
    z = s * inv
    s_logp = z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)
    ratio = torch.where(w > 0, t_logp - s_logp, 0.0)  # as in _kl_rows: no inf * 0 where w == 0
    return (w * ratio).sum(-1) * temperature**2


def _forward_kl_topk_tokens(
    s: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    tail: str = "bucket",
    tail_samples: int = 0,
) -> Tensor:
    """Per-token forward KL against a cached top-k teacher; fp32 ``s`` [N, V], ids/logprobs [N, K]."""
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"forward_kl_topk: tail must be 'bucket' or 'renormalize', got {tail!r}")
    n_draws = int(tail_samples)  # divergence_kwargs from YAML may carry it as a float
    if n_draws != tail_samples or not 0 <= n_draws <= topk_ids.shape[-1]:
        raise ValueError(f"forward_kl_topk: tail_samples must be an integer in [0, K={topk_ids.shape[-1]}], "
                         f"got {tail_samples!r}")
    if n_draws and tail != "bucket":
        raise ValueError(
            "forward_kl_topk: tail_samples estimates the tail; it cannot be combined with tail='renormalize'"
        )
    lp = topk_logprobs.float()
    if n_draws:
        return _forward_kl_sampled_tail_tokens(s, topk_ids, lp, temperature, n_draws)
    real = torch.isfinite(lp)  # entries with log-prob -inf are padding
    if tail == "renormalize":
        t_logp = F.log_softmax(lp / temperature, dim=-1)
        s_k = s.gather(-1, topk_ids).masked_fill(~real, float("-inf"))
        s_logp = F.log_softmax(s_k / temperature, dim=-1)
        return _kl_rows(t_logp, s_logp) * temperature**2

    # Teacher: the missing mass of the tau = 1 log-probs, 1 - sum p = -expm1(log sum p) (no cancellation).
    t_tail = -torch.expm1(torch.logsumexp(lp, dim=-1))
    t_tail = torch.where(t_tail > TOPK_TAIL_ATOL, t_tail, 0.0)
    t_vec = torch.cat([lp, t_tail.log().unsqueeze(-1)], dim=-1)  # K + 1 outcomes
    # The whole (top-k, tail-as-one-outcome) vector is tempered and renormalised (a no-op at tau = 1).
    t_logp = F.log_softmax(t_vec / temperature, dim=-1)

    # Student: exact tempered distribution over the full vocabulary, coarsened to the same K + 1 outcomes.
    z = s / temperature
    lse = torch.logsumexp(z, dim=-1)
    s_k = z.gather(-1, topk_ids) - lse.unsqueeze(-1)
    in_topk = torch.zeros_like(z).scatter_add_(-1, topk_ids, real.to(z.dtype)) > 0
    # A finite fill (not -inf) keeps logsumexp's gradient finite when the complement is empty (K = V).
    s_tail = torch.logsumexp(z.masked_fill(in_topk, _FP32_MIN), dim=-1) - lse
    s_logp = torch.cat([s_k, s_tail.unsqueeze(-1)], dim=-1)
    return _kl_rows(t_logp, s_logp) * temperature**2


def _check_topk(topk_ids: Tensor, topk_logprobs: Tensor, leading: tuple) -> None:
    if topk_ids.shape != topk_logprobs.shape or tuple(topk_ids.shape[:-1]) != tuple(leading):
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both be "
            f"[..., K] with the leading shape of the labels {tuple(leading)}"
        )
    if topk_ids.dtype != torch.long:
        raise ValueError(f"topk_ids must be int64 (torch.long), got {topk_ids.dtype}")


def forward_kl_topk(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    tail: str = "bucket",
    tail_samples: int = 0,
) -> Tensor:
    """Forward KL against a teacher given only by its cached top-k: ``tau^2 * mean_t KL``.

    ``topk_ids`` [..., K] (int64) and ``topk_logprobs`` [..., K] are the teacher's K most likely tokens
    and their log-probabilities, computed at tau = 1 over the full vocabulary (cache them in fp32).
    Entries whose log-prob is -inf are padding and ignored; real ids must be distinct.

    ``tail="bucket"`` (default): the teacher's missing mass ``1 - sum_k p_k`` is one more outcome,
    matched by the student's mass outside the (real) top-k ids, so both distributions are coarsened to
    K + 1 outcomes and
    ``KL = sum_k pT_k (log pT_k - log pS_k) + pT_tail (log pT_tail - log pS_tail)``.
    This is the exact KL between the coarsened distributions and never exceeds the full-vocabulary KL.
    Tails at or below ``TOPK_TAIL_ATOL`` are rounding noise and count as 0.

    ``tail="renormalize"``: the teacher's top-k probabilities are renormalised to 1 and the student's
    are renormalised over the same ids; the student's mass elsewhere is ignored.

    Temperature (approximate when tau != 1, since only top-k log-probs at tau = 1 are known): the
    teacher's cached vector is tempered as it stands, ``p ∝ exp(logp / tau)``, with the tail taking part
    as one outcome of log-probability ``log pT_tail`` (bucket) or left out (renormalize). The true tempered
    tail is a sum of many small tempered probabilities and is larger than the tempered lump for tau > 1,
    so tau > 1 under-weights the tail. The student side is exact: ``softmax(z / tau)`` over the full
    vocabulary, then coarsened. With K = V both modes equal ``forward_kl``.

    ``tail_samples=S`` (> 0, with ``tail="bucket"``): the last S columns are not top entries but S
    independent draws from the teacher's tail (p restricted to the tokens outside the first K - S ids,
    renormalised; ids may repeat), each with its true log-probability, as ``teacherfit cache-teacher``
    stores them. The tail mass ``P = 1 - sum of the first K - S probabilities`` is split evenly over the
    draws and the tail's share of the KL is estimated as ``P / S * sum_s (log pT_s - log pS_s)``. At
    tau = 1 this is an unbiased estimate of the full-vocabulary KL and of its gradient, where the bucket
    gives a lower bound that misses ``P * KL(teacher tail || student tail)`` (several % of the KL for real
    pairs, see ``teacherfit.distill.cache``). At tau != 1 the draws are reweighted by ``p_s^(1/tau - 1)``
    and all weights normalised together (self-normalised importance sampling: consistent, not unbiased).
    """
    _check_temperature(temperature)
    _check_labels(student_logits, labels)
    _check_topk(topk_ids, topk_logprobs, tuple(labels.shape))
    mask = labels != ignore_index
    s = student_logits[mask].float()
    per_token = _forward_kl_topk_tokens(s, topk_ids[mask], topk_logprobs[mask], temperature, tail, tail_samples)
    return _mean(per_token.sum(), s.shape[0])


# ---------------------------------------------------------------- attention maps


def attention_kl_sums(
    student_attn: Tensor, teacher_attn: Tensor, query_mask: Tensor, *, eps: float = 1e-10
) -> tuple[Tensor, int]:
    """Sum over heads and masked queries of ``sum_j A_T (log A_T - log A_S)``, and how many terms.

    Returns ``(total, count)`` with ``count = heads * masked queries``, so that callers can average over
    layers and query chunks exactly (``sum of totals / sum of counts``). See ``attention_kl``.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(
            f"attention maps must be [B, H, Tq, Tk], got student {tuple(student_attn.shape)} and "
            f"teacher {tuple(teacher_attn.shape)}"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention head counts differ (student {student_attn.shape[1]}, teacher "
            f"{teacher_attn.shape[1]}): map or average the teacher's heads to the student's before "
            "attention_kl"
        )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} must have the same shape"
        )
    b, h, tq, _ = student_attn.shape
    if tuple(query_mask.shape) != (b, tq):
        raise ValueError(f"query_mask must be [B, Tq] = {(b, tq)}, got {tuple(query_mask.shape)}")
    query_mask = query_mask.bool()
    # Select the response query rows first ([N, H, Tk]), then upcast only those.
    a_s = student_attn.transpose(1, 2)[query_mask].float()
    a_t = teacher_attn.transpose(1, 2)[query_mask].float()
    terms = torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(eps).log()
    return terms.sum(), a_s.shape[0] * h


def attention_kl(
    student_attn: Tensor, teacher_attn: Tensor, query_mask: Tensor, *, eps: float = 1e-10
) -> Tensor:
    """KL between post-softmax attention rows, the paper's L_attn for one layer.

    ``student_attn`` and ``teacher_attn`` are [B, H, Tq, Tk] maps (rows sum to 1; causal rows put no
    mass on future keys; Tk may exceed Tq when the queries are the last Tq positions). ``query_mask``
    [B, Tq] (bool) marks the response query positions. Returns the mean over (head, masked query) of
    ``sum_j A_T (log A_T - log A_S)`` in fp32, where ``0 * log 0`` terms are 0 and ``log A_S`` is taken
    of ``max(A_S, eps)``. Head counts must match: mapping or averaging heads (e.g. for grouped-query
    attention or different head counts) is the caller's job. 0, attached to the graph, on an empty mask.
    """
    total, count = attention_kl_sums(student_attn, teacher_attn, query_mask, eps=eps)
    return _mean(total, count)


# ---------------------------------------------------------------- chunked LM-head path


def _apply(post: Callable[[Tensor], Tensor] | None, z: Tensor) -> Tensor:
    return z if post is None else post(z)


def _is_identity(post: Callable[[Tensor], Tensor] | None) -> bool:
    return post is None or bool(getattr(post, "identity", False))


def linear_head_params(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [V, d], bias [V] | None)`` of a plain linear LM head, or None when it is something else.

    A head may offer ``linear_params()`` (as ``models.VocabHead`` does for padded vocabularies). Heads
    whose weights are not materialised in the module (DeepSpeed ZeRO-3 partitions, empty placeholders) and
    any other module (e.g. a LoRA-wrapped head) return None: ``chunked_head_losses`` then takes its
    checkpointed path, which only calls the module.
    """
    if hasattr(head, "linear_params"):
        params = head.linear_params()
    elif type(head) is nn.Linear:
        params = (head.weight, head.bias)
    else:
        return None
    if params is None or params[0].numel() == 0 or hasattr(params[0], "ds_id"):
        return None
    return params


def _forward_kl_chunk_grad(
    z: Tensor, t: Tensor, temperature: float, kd_weight: float, y: Tensor | None, ce_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-KL sum, CE sum and their weighted gradient for one chunk, in place over ``z`` and ``t``.

    The fused path's kernel for the default divergence: ``z`` (student) and ``t`` (teacher) are fp32 logits
    [c, V] owned by the caller and overwritten; besides them only one more [c, V] tensor is allocated,
    where autograd on ``_forward_kl_tokens`` keeps about six, and the passes over [c, V] are few (the
    per-row sums are dot products, which need no temporary). Same values as ``_forward_kl_tokens`` and
    ``F.cross_entropy``; the gradient is the closed form d/dz [tau^2 KL(p_t || softmax(z / tau))] =
    tau * (softmax(z / tau) - p_t), plus ce_weight * (softmax(z) - onehot(y)), which needs tau = 1 when
    ce_weight != 0 (the caller checks). Logits must be finite (the caller checks).
    """
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
        t.mul_(1.0 / temperature)
    lse_z = torch.logsumexp(z, -1)
    ce = torch.zeros((), dtype=torch.float32, device=z.device)
    if y is not None:  # CE at tau = 1 (the caller checks that tau = 1 when the CE has a weight)
        raw_lse = lse_z if temperature == 1.0 else torch.logsumexp(z * temperature, -1)
        ce = (raw_lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1) * temperature).sum()
    t.sub_(torch.logsumexp(t, -1, keepdim=True))  # log p
    p = t.exp()
    # KL(p || q) per row = sum p log p - sum p z + lse(z), since sum p = 1 and log q = z - lse(z)
    # fp32 dot products even under autocast (which runs vecdot in bf16: the difference of the two then cancels
    # most of its digits, and the logged KD was wrong while its gradient was right)
    with torch.autocast(z.device.type, enabled=False):
        kd = (torch.linalg.vecdot(p, t) - torch.linalg.vecdot(p, z) + lse_z).sum() * temperature**2
    dz = z.sub_(lse_z.unsqueeze(-1)).exp_()  # q
    if y is not None and ce_weight != 0:  # tau == 1 here, so q = softmax(z) serves both terms
        dz.mul_(kd_weight + ce_weight).sub_(p, alpha=kd_weight)
        rows = torch.arange(dz.shape[0], device=dz.device)
        dz[rows, y] -= ce_weight
    else:
        dz.sub_(p).mul_(temperature * kd_weight)
    return kd, ce, dz


class _FusedHeadLoss(torch.autograd.Function):
    """``kd_weight * kd_sum + ce_weight * ce_sum`` of a linear head, its gradients computed chunk by chunk in forward.

    Why by hand: neither torch nor transformers offers a fused linear + divergence loss for two models
    (Liger-Kernel has fused linear cross-entropy and a JSD, but Triton-only and not for our divergences
    or top-k teachers). For each chunk of tokens the head's logits are computed once, the loss terms and
    d(loss)/d(logits) come from autograd on that chunk alone (any divergence, post-head transform, top-k teacher), and
    the chunk's share of d/d(hidden) and d/d(weight) is formed at once by two matmuls. Backward then only
    scales the stored gradients. Against checkpointing this saves the recomputation of both heads during
    backward (a third of the head FLOPs) and every chunk-sized tensor is freed before the next chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, chunk_grad, chunk_size, kd_weight, ce_weight):
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        dev = h.device
        kd_total = torch.zeros((), dtype=torch.float32, device=dev)
        ce_total = torch.zeros((), dtype=torch.float32, device=dev)
        n = h.shape[0]
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            h_c = h[sl]
            z = F.linear(h_c, weight, bias).float()
            kd, ce, dz = chunk_grad(z, start)  # dz: d(kd_weight * kd + ce_weight * ce) / dz, or None
            del z
            if dz is not None:
                if need_h:
                    grad_h[sl] = (dz.to(weight.dtype) @ weight).to(h.dtype)
                if need_w:
                    grad_w.addmm_(dz.t(), h_c.float())
                if need_b:
                    grad_b += dz.sum(0)
                del dz
            kd_total += kd
            ce_total += ce
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        loss = kd_weight * kd_total + ce_weight * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w, grad_b = ctx.grads
        del ctx.grads
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None


def chunked_head_losses(
    student_hidden: Tensor,
    student_head: nn.Module,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: nn.Module | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    teacher_sampled: Tensor | None = None,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    need_ce: bool = True,
    post_head: Callable[[Tensor], Tensor] | None = None,
    teacher_post_head: Callable[[Tensor], Tensor] | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    fused: bool = True,
) -> dict:
    """Divergence and cross-entropy SUMS over response tokens, without full-vocabulary logits.

    ``student_hidden`` [B, T, d] are the final hidden states (after the final norm) aligned with
    ``labels`` [B, T]: the hidden state at t predicts ``labels[t]``. ``student_head`` is the LM head
    module (e.g. ``nn.Linear``, weight possibly tied). The teacher is given either as
    ``teacher_hidden`` [B, T, d_t] + ``teacher_head`` (evaluated under ``no_grad``), or as
    ``teacher_topk = (ids [B, T, K], logprobs [B, T, K])`` (``forward_kl_topk``; then ``divergence``
    must be ``"forward_kl"`` and ``divergence_kwargs`` may set ``tail`` and ``tail_samples``; a cache's
    own setting is ``TopKCache.loss_kwargs()``), or as ``teacher_sampled`` [B, T] = the teacher's log-probability of
    each label token (a server that returns only the sampled tokens'; ``divergence="sampled_reverse_kl"``), or not
    at all (CE only). ``sampled_reverse_kl`` (``sampled_token_terms``) also takes ``teacher_hidden`` + head.

    Returns ``{"loss_sum", "kd_sum", "ce_sum", "n_tokens"}``: sums, not means, so the training loop can
    normalise by the real token count across gradient accumulation. ``loss_sum = kd_weight * kd_sum +
    ce_weight * ce_sum`` is the tensor to differentiate. A term that is not computed (no teacher, or
    ``need_ce=False``) is a constant 0. With ``ce_weight == 0`` the CE is still computed, without
    gradient, for the log. With no masked tokens every sum is an exact 0 and backward gives zero gradients.

    How memory stays bounded: masked positions are selected first, so prompt tokens cost nothing, and the
    selected tokens are processed ``chunk_size`` at a time; every vocabulary-sized tensor (the logits of
    both heads and the loss's intermediates) lives only while its chunk is processed. Peak extra memory is
    a few ``chunk_size x V`` fp32 tensors. Two paths, same values and gradients (tested):

    - ``fused=True`` (default, when the student head is a plain linear layer, see ``linear_head_params``):
      each chunk's gradients with respect to the hidden states and the head weight are computed during
      forward (``_FusedHeadLoss``); both heads run once. ``kd_sum`` and ``ce_sum`` carry no gradient.
    - otherwise (or ``fused=False``): each chunk runs inside ``torch.utils.checkpoint`` and is recomputed
      during backward, teacher head included. ``kd_sum`` and ``ce_sum`` are differentiable too.

    ``post_head`` / ``teacher_post_head``: what the architecture does to the head's output before the softmax
    (``teacherfit.scoring.PostHead``: Granite's and Cohere's logit scaling, Gemma 2's soft-capping), a callable
    applied to each chunk's fp32 logits; None (or an identity) for none. CE is at tau = 1 on the transformed
    student logits. The in-place forward-KL kernel serves identity transforms only; others take autograd.
    """
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head must be given together")
    if sum(x is not None for x in (teacher_hidden, teacher_topk, teacher_sampled)) > 1:
        raise ValueError(
            "give the teacher either as teacher_hidden + teacher_head, teacher_topk or teacher_sampled, not several"
        )
    sampled = divergence == "sampled_reverse_kl"
    if teacher_sampled is not None and not sampled:
        raise ValueError(f"teacher_sampled (the sampled tokens' log-probs) supports sampled_reverse_kl only, "
                         f"got {divergence!r}")
    if sampled and temperature != 1.0:
        raise ValueError("sampled_reverse_kl scores the student's samples at temperature 1")
    if teacher_sampled is not None and teacher_sampled.shape != labels.shape:
        raise ValueError(f"teacher_sampled {tuple(teacher_sampled.shape)} must match labels {tuple(labels.shape)}")
    if student_hidden.dim() < 2 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of student_hidden "
            f"{tuple(student_hidden.shape)} without its last dimension"
        )
    kwargs = dict(divergence_kwargs or {})
    if "temperature" in kwargs:
        raise ValueError("pass temperature as chunked_head_losses(temperature=...), not in divergence_kwargs")
    if teacher_topk is not None:
        if divergence != "forward_kl":
            raise ValueError(
                f"a top-k teacher supports divergence='forward_kl' only (forward_kl_topk), got {divergence!r}"
            )
        if not _is_identity(teacher_post_head):
            raise ValueError("teacher_post_head does not apply to a top-k teacher (its log-probs are cached)")
        _check_topk(teacher_topk[0], teacher_topk[1], tuple(labels.shape))
    elif divergence not in _DIVERGENCE_TOKENS and not sampled:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(_DIVERGENCE_TOKENS)}")
    if teacher_hidden is not None and teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must match labels {tuple(labels.shape)} "
            "in its leading dimensions"
        )

    # 1) Response tokens only.
    flat_mask = (labels != ignore_index).reshape(-1)
    idx = flat_mask.nonzero().squeeze(-1)
    n = idx.numel()
    h = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    y = labels.reshape(-1).index_select(0, idx)
    t_h = ids = lps = t_lp = None
    if teacher_sampled is not None:
        t_lp = teacher_sampled.detach().reshape(-1).index_select(0, idx)
    if teacher_hidden is not None:
        t_h = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx)
    if teacher_topk is not None:
        k = teacher_topk[0].shape[-1]
        ids = teacher_topk[0].reshape(-1, k).index_select(0, idx)
        lps = teacher_topk[1].detach().reshape(-1, k).index_select(0, idx)
    has_teacher = t_h is not None or ids is not None or t_lp is not None
    zero = torch.zeros((), dtype=torch.float32, device=student_hidden.device)

    # 2) The terms of one chunk, from its student logits ``z_raw`` [c, V] (fp32, before the post-head transform).
    post_head = None if _is_identity(post_head) else post_head
    teacher_post_head = None if _is_identity(teacher_post_head) else teacher_post_head

    def chunk_terms(z_raw: Tensor, start: int) -> tuple[Tensor, Tensor]:
        sl = slice(start, start + z_raw.shape[0])
        z = _apply(post_head, z_raw)
        kd = ce = zero
        if t_h is not None:
            with torch.no_grad():
                t_z = _apply(teacher_post_head, teacher_head(t_h[sl]).float())
            if t_z.shape[-1] != z.shape[-1]:
                raise ValueError(
                    f"student and teacher vocabularies differ ({z.shape[-1]} vs {t_z.shape[-1]} logits): "
                    "align the vocabularies before distilling"
                )
            if sampled:
                t_y = t_z.log_softmax(-1).gather(-1, y[sl].unsqueeze(-1)).squeeze(-1)
                kd = sampled_token_terms(z, t_y, y[sl])[1].sum()
            else:
                kd = _DIVERGENCE_TOKENS[divergence](z, t_z, temperature, **kwargs).sum()
            del t_z
        elif t_lp is not None:
            kd = sampled_token_terms(z, t_lp[sl], y[sl])[1].sum()
        elif ids is not None:
            kd = _forward_kl_topk_tokens(z, ids[sl], lps[sl], temperature, **kwargs).sum()
        if need_ce:
            if ce_weight != 0:
                ce = F.cross_entropy(z, y[sl], reduction="sum")
            else:  # for the log only: no graph, no [c, V] log-softmax
                with torch.no_grad():
                    ce = (torch.logsumexp(z, -1) - z.gather(-1, y[sl].unsqueeze(-1)).squeeze(-1)).sum()
        return kd, ce

    def result(loss_sum: Tensor, kd_sum: Tensor, ce_sum: Tensor) -> dict:
        return {"loss_sum": loss_sum, "kd_sum": kd_sum if has_teacher else zero,
                "ce_sum": ce_sum if need_ce else zero, "n_tokens": n}

    # The in-place forward-KL kernel serves the default setting; anything else takes autograd on the chunk.
    fast_kl = (t_h is not None and divergence == "forward_kl" and not kwargs and post_head is None
               and teacher_post_head is None and (not need_ce or ce_weight == 0 or temperature == 1.0))

    def chunk_grad(z_raw: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(kd sum, ce sum, d(kd_weight * kd + ce_weight * ce) / d z_raw) of one chunk; runs under no_grad."""
        if fast_kl:
            sl = slice(start, start + z_raw.shape[0])
            t_z = teacher_head(t_h[sl]).float()
            if t_z.shape[-1] != z_raw.shape[-1]:
                raise ValueError(
                    f"student and teacher vocabularies differ ({z_raw.shape[-1]} vs {t_z.shape[-1]} logits): "
                    "align the vocabularies before distilling"
                )
            if bool(torch.isfinite(t_z).all()) and bool(torch.isfinite(z_raw).all()):
                return _forward_kl_chunk_grad(z_raw, t_z, temperature, float(kd_weight),
                                              y[sl] if need_ce else None, float(ce_weight))
            del t_z
        z = z_raw.detach().requires_grad_(True)
        with torch.enable_grad():
            kd, ce = chunk_terms(z, start)
            objective = kd_weight * kd + ce_weight * ce
        dz = torch.autograd.grad(objective, z)[0] if objective.requires_grad else None
        return kd.detach(), ce.detach(), dz

    params = linear_head_params(student_head) if fused else None
    trains = torch.is_grad_enabled() and (
        h.requires_grad or any(p.requires_grad for p in student_head.parameters()))
    if params is not None and trains:
        loss_sum, kd_sum, ce_sum = _FusedHeadLoss.apply(h, params[0], params[1], chunk_grad, chunk_size,
                                                       float(kd_weight), float(ce_weight))
        return result(loss_sum, kd_sum, ce_sum)

    def chunk_sums(h_c: Tensor, start: int) -> tuple[Tensor, Tensor]:
        return chunk_terms(student_head(h_c).float(), start)

    kd_sum = ce_sum = zero
    # With no masked token, one empty chunk runs: its sums over zero rows are exact zeros attached to
    # the graph of the head and the hidden states.
    for start in range(0, max(n, 1), chunk_size):
        h_c = h[start : start + chunk_size]
        if trains:
            kd, ce = checkpoint(chunk_sums, h_c, start, use_reentrant=False)
        else:
            kd, ce = chunk_sums(h_c, start)
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    return result(kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum)
