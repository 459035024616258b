"""distill.losses: each loss against a naive loop reference written out here, invariants, hand-checked tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teacherfit.distill.losses import (
    DIVERGENCES,
    TOPK_TAIL_ATOL,
    attention_kl,
    attention_kl_sums,
    chunked_head_losses,
    cross_entropy,
    forward_kl,
    forward_kl_topk,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    tvd,
)
from teacherfit.scoring import PostHead

# ---------------------------------------------------------------- naive references (float64 Python loops)


def naive_softmax(row, tau=1.0):
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    z = sum(e)
    return [v / z for v in e]


def naive_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def naive_token_divergence(name, s_row, t_row, tau, **kw):
    ps, pt = naive_softmax(s_row, tau), naive_softmax(t_row, tau)
    if name == "forward_kl":
        return tau**2 * naive_kl(pt, ps)
    if name == "reverse_kl":
        return tau**2 * naive_kl(ps, pt)
    if name == "generalized_jsd":
        beta = kw["beta"]
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return tau**2 * (beta * naive_kl(pt, m) + (1 - beta) * naive_kl(ps, m))
    if name == "skew_kl":
        alpha = kw["alpha"]
        m = [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)]
        return tau**2 * naive_kl(pt, m)
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    raise KeyError(name)


def naive_masked_mean(name, s, t, labels, tau, **kw):
    s, t, labels = s.double().tolist(), t.double().tolist(), labels.tolist()
    total, n = 0.0, 0
    for b in range(len(labels)):
        for i in range(len(labels[b])):
            if labels[b][i] == -100:
                continue
            total += naive_token_divergence(name, s[b][i], t[b][i], tau, **kw)
            n += 1
    return total / n


def naive_cross_entropy(s, labels):
    s, labels = s.double().tolist(), labels.tolist()
    total, n = 0.0, 0
    for b in range(len(labels)):
        for i in range(len(labels[b])):
            if labels[b][i] == -100:
                continue
            total -= math.log(naive_softmax(s[b][i])[labels[b][i]])
            n += 1
    return total / n


def naive_topk_token(s_row, ids, logprobs, tau, tail):
    """The documented top-k rule, written out: coarsen, temper the teacher's cached vector, KL."""
    ps = naive_softmax(s_row, tau)
    pk = [math.exp(v) for v in logprobs]
    if tail == "renormalize":
        w = [math.exp(v / tau) for v in logprobs]
        pt = [x / sum(w) for x in w]
        qs = [ps[i] for i in ids]
        qs = [x / sum(qs) for x in qs]
        return tau**2 * naive_kl(pt, qs)
    t_tail = 1.0 - sum(pk)
    if t_tail <= TOPK_TAIL_ATOL:
        t_tail = 0.0
    w = [math.exp(v / tau) for v in logprobs] + [t_tail ** (1.0 / tau)]
    pt = [x / sum(w) for x in w]
    qs = [ps[i] for i in ids] + [sum(p for j, p in enumerate(ps) if j not in set(ids))]
    return tau**2 * naive_kl(pt, qs)


def naive_attention_kl(a_s, a_t, query_mask, eps):
    a_s, a_t, query_mask = a_s.double().tolist(), a_t.double().tolist(), query_mask.tolist()
    total, n = 0.0, 0
    for b in range(len(a_s)):
        for h in range(len(a_s[b])):
            for i in range(len(a_s[b][h])):
                if not query_mask[b][i]:
                    continue
                for j in range(len(a_s[b][h][i])):
                    pt, ps = a_t[b][h][i][j], a_s[b][h][i][j]
                    if pt > 0:
                        total += pt * (math.log(pt) - math.log(max(ps, eps)))
                n += 1
    return total / n


# ---------------------------------------------------------------- fixtures


DIV_KWARGS = {
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "tvd": {},
}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g) * 2
    t = torch.randn(2, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    labels[1, 3] = -100
    return s, t, labels


# ---------------------------------------------------------------- divergences vs naive references


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_matches_naive_reference(batch, name, tau):
    s, t, labels = batch
    got = DIVERGENCES[name](s, t, labels, temperature=tau, **DIV_KWARGS[name])
    want = naive_masked_mean(name, s, t, labels, tau, **DIV_KWARGS[name])
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_naive_reference_over_beta(batch, beta):
    s, t, labels = batch
    got = generalized_jsd(s, t, labels, beta=beta)
    assert got.item() == pytest.approx(
        naive_masked_mean("generalized_jsd", s, t, labels, 1.0, beta=beta), rel=1e-5
    )


def test_cross_entropy_matches_naive_reference(batch):
    s, _, labels = batch
    assert cross_entropy(s, labels).item() == pytest.approx(naive_cross_entropy(s, labels), rel=1e-6)


def test_flat_shapes_accepted(batch):
    s, t, labels = batch
    flat = forward_kl(s.reshape(-1, 11), t.reshape(-1, 11), labels.reshape(-1))
    assert flat.item() == pytest.approx(forward_kl(s, t, labels).item(), rel=1e-6)


def test_hand_checked_two_token_vocab():
    # Teacher p_T = (0.75, 0.25) (logits log 3, 0); student p_S = (0.5, 0.5) (logits 0, 0).
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    y = torch.tensor([0])
    # KL(T||S) = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.1308120
    assert forward_kl(s, t, y).item() == pytest.approx(0.1308120, abs=1e-6)
    # KL(S||T) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = -0.2027326 + 0.3465736 = 0.1438410
    assert reverse_kl(s, t, y).item() == pytest.approx(0.1438410, abs=1e-6)
    # m = (0.625, 0.375); KL(T||m) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.1367413 - 0.1013663 = 0.0353750
    # KL(S||m) = 0.5 ln 0.8 + 0.5 ln(4/3) = -0.1115718 + 0.1438410 = 0.0322692; JSD = (0.0353750 + 0.0322692) / 2
    assert generalized_jsd(s, t, y, beta=0.5).item() == pytest.approx(0.0338221, abs=1e-6)
    # skew alpha = 0.5 is KL(T||m) with the same m
    assert skew_kl(s, t, y, alpha=0.5).item() == pytest.approx(0.0353750, abs=1e-6)
    # TVD = 0.5 (|0.75 - 0.5| + |0.25 - 0.5|) = 0.25
    assert tvd(s, t, y).item() == pytest.approx(0.25, abs=1e-7)
    # CE of label 0 under the student = -ln 0.5
    assert cross_entropy(s, y).item() == pytest.approx(0.6931472, abs=1e-6)
    # tau = 2 with teacher logits doubled gives the same tempered distributions: forward KL * tau^2 = 4x
    assert forward_kl(s, 2 * t, y, temperature=2.0).item() == pytest.approx(4 * 0.1308120, abs=1e-5)
    # TVD is not rescaled by tau^2
    assert tvd(s, 2 * t, y, temperature=2.0).item() == pytest.approx(0.25, abs=1e-7)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_identical_inputs_give_zero(batch, name):
    s, _, labels = batch
    assert DIVERGENCES[name](s, s.clone(), labels, **DIV_KWARGS[name]).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_forward_kl_agrees_with_torch_kl_div(batch, tau):
    s, t, labels = batch
    per_token = F.kl_div(
        F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="none"
    ).sum(-1)
    mask = labels != -100
    want = tau**2 * per_token[mask].sum() / mask.sum()
    assert forward_kl(s, t, labels, temperature=tau).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_generalized_jsd_end_points_and_symmetry(batch, tau):
    s, t, labels = batch
    fkl = forward_kl(s, t, labels, temperature=tau)
    rkl = reverse_kl(s, t, labels, temperature=tau)
    assert generalized_jsd(s, t, labels, beta=0.0, temperature=tau).item() == pytest.approx(
        fkl.item(), rel=1e-6
    )
    assert generalized_jsd(s, t, labels, beta=1.0, temperature=tau).item() == pytest.approx(
        rkl.item(), rel=1e-6
    )
    a = generalized_jsd(s, t, labels, beta=0.5, temperature=tau)
    b = generalized_jsd(t, s, labels, beta=0.5, temperature=tau)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # JSD at beta = 0.5 is bounded by tau^2 ln 2
    assert 0 < a.item() <= tau**2 * math.log(2)


def test_skew_kl_alpha_zero_is_forward_kl_and_skew_is_smaller(batch):
    s, t, labels = batch
    fkl = forward_kl(s, t, labels)
    assert skew_kl(s, t, labels, alpha=0.0).item() == pytest.approx(fkl.item(), rel=1e-6)
    assert skew_kl(s, t, labels, alpha=0.3).item() < fkl.item()


def test_all_nonnegative_and_tvd_bounded():
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(4, 6, dtype=torch.long)
    for scale in (0.1, 1.0, 10.0, 100.0):
        s = torch.randn(4, 6, 13, generator=g) * scale
        t = torch.randn(4, 6, 13, generator=g) * scale
        for name, fn in DIVERGENCES.items():
            assert fn(s, t, labels, **DIV_KWARGS[name]).item() >= 0.0, name
        assert 0.0 <= tvd(s, t, labels).item() <= 1.0
    # disjoint point masses reach the bound
    s = torch.tensor([[1e4, -1e4]])
    t = torch.tensor([[-1e4, 1e4]])
    assert tvd(s, t, torch.tensor([0])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradients_finite_with_extreme_logits(name):
    g = torch.Generator().manual_seed(2)
    s = (torch.randint(0, 2, (2, 3, 7), generator=g).float() * 2 - 1) * 1e4
    t = (torch.randint(0, 2, (2, 3, 7), generator=g).float() * 2 - 1) * 1e4
    s.requires_grad_(True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    for tau in (1.0, 2.0):
        loss = DIVERGENCES[name](s, t, labels, temperature=tau, **DIV_KWARGS[name])
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradients_finite_with_shared_infinite_logits(name):
    # Masked vocabulary entries (-inf in both models) must not turn the loss or its gradient into NaN.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 3, 6, generator=g)
    t = torch.randn(1, 3, 6, generator=g)
    s[..., -2:] = float("-inf")
    t[..., -2:] = float("-inf")
    s.requires_grad_(True)
    labels = torch.zeros(1, 3, dtype=torch.long)
    loss = DIVERGENCES[name](s, t, labels, **DIV_KWARGS[name])
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want = DIVERGENCES[name](s[..., :-2], t[..., :-2], labels, **DIV_KWARGS[name])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_empty_mask_gives_exact_zero_with_working_backward(batch):
    s, t, _ = batch
    s = s.clone().requires_grad_(True)
    labels = torch.full((2, 5), -100)
    losses = [fn(s, t, labels, **DIV_KWARGS[name]) for name, fn in DIVERGENCES.items()]
    losses.append(cross_entropy(s, labels))
    lp = F.log_softmax(t, -1)
    top = lp.topk(4, -1)
    for tail in ("bucket", "renormalize"):
        losses.append(forward_kl_topk(s, top.indices, top.values, labels, tail=tail))
    for loss in losses:
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.equal(grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bf16_inputs_are_computed_in_fp32(batch, name):
    s, t, labels = batch
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = DIVERGENCES[name](s16, t16, labels, temperature=2.0, **DIV_KWARGS[name])
    # Same inputs (already rounded to bf16) in fp32: only fp32 rounding may differ.
    want = DIVERGENCES[name](s16.float(), t16.float(), labels, temperature=2.0, **DIV_KWARGS[name])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    # and within bf16 input rounding of the unrounded fp32 inputs
    exact = DIVERGENCES[name](s, t, labels, temperature=2.0, **DIV_KWARGS[name])
    assert got.item() == pytest.approx(exact.item(), rel=3e-2, abs=1e-3)
    ce16 = cross_entropy(s16, labels)
    assert ce16.dtype == torch.float32
    assert ce16.item() == pytest.approx(cross_entropy(s16.float(), labels).item(), rel=1e-6)


def test_input_validation(batch):
    s, t, labels = batch
    with pytest.raises(ValueError, match="vocabularies differ"):
        forward_kl(s, t[..., :10], labels)
    with pytest.raises(ValueError, match="labels"):
        forward_kl(s, t, labels[:, :4])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, labels, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_kl(s, t, labels, alpha=1.0)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, labels, temperature=0.0)
    top = t.topk(3, -1)
    with pytest.raises(ValueError, match="tail"):
        forward_kl_topk(s, top.indices, top.values, labels, tail="drop")


# ---------------------------------------------------------------- top-k teacher


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_with_full_vocab_equals_forward_kl(batch, tail, tau):
    s, t, labels = batch
    top = F.log_softmax(t, -1).topk(11, -1)
    got = forward_kl_topk(s, top.indices, top.values, labels, temperature=tau, tail=tail)
    assert got.item() == pytest.approx(forward_kl(s, t, labels, temperature=tau).item(), abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_matches_naive_reference(batch, tail, tau):
    s, t, labels = batch
    top = F.log_softmax(t, -1).topk(4, -1)
    got = forward_kl_topk(s, top.indices, top.values, labels, temperature=tau, tail=tail)
    sl, ids, lps, ys = (
        s.double().tolist(),
        top.indices.tolist(),
        top.values.double().tolist(),
        labels.tolist(),
    )
    vals = [
        naive_topk_token(sl[b][i], ids[b][i], lps[b][i], tau, tail)
        for b in range(2)
        for i in range(5)
        if ys[b][i] != -100
    ]
    assert got.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_topk_bucket_is_below_full_kl(batch):
    s, t, labels = batch
    full = forward_kl(s, t, labels).item()
    lp = F.log_softmax(t, -1)
    for k in (1, 3, 6, 10):
        top = lp.topk(k, -1)
        assert forward_kl_topk(s, top.indices, top.values, labels, tail="bucket").item() <= full + 1e-6


def test_topk_bucket_is_accurate_for_a_peaked_teacher():
    g = torch.Generator().manual_seed(4)
    n, v, k = 16, 1000, 8
    t = torch.randn(n, v, generator=g)
    hot = torch.randint(0, v, (n, 4), generator=g)
    t.scatter_(1, hot, 12.0 + torch.rand(n, 4, generator=g) * 3)  # a few tokens carry ~99% of the mass
    s = t + torch.randn(n, v, generator=g)  # a student near the teacher
    labels = torch.zeros(n, dtype=torch.long)
    full = forward_kl(s, t, labels).item()
    top = F.log_softmax(t, -1).topk(k, -1)
    approx = forward_kl_topk(s, top.indices, top.values, labels, tail="bucket").item()
    tail_mass = 1 - top.values.exp().sum(-1)
    assert tail_mass.max() < 0.05
    assert approx <= full
    assert (full - approx) / full < 0.01  # measured: about 0.06% (tail mass < 0.1%)


def test_topk_padding_entries_are_ignored(batch):
    s, t, labels = batch
    top = F.log_softmax(t, -1).topk(3, -1)
    # pad K from 3 to 5 with id 0 (which may also be a real top-k id) and log-prob -inf
    ids = torch.cat([top.indices, torch.zeros(2, 5, 2, dtype=torch.long)], -1)
    lps = torch.cat([top.values, torch.full((2, 5, 2), float("-inf"))], -1)
    for tail in ("bucket", "renormalize"):
        want = forward_kl_topk(s, top.indices, top.values, labels, tail=tail)
        got = forward_kl_topk(s, ids, lps, labels, tail=tail)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_gradients_finite_for_extreme_and_peaked_inputs(tail):
    s = torch.tensor([[1e4, -1e4, 0.0, -1e4, 5.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0, -1e4, 1e4]])
    labels = torch.tensor([0])
    for k in (2, 5):  # tail ~0 and K = V (empty student complement)
        top = F.log_softmax(t, -1).topk(k, -1)
        loss = forward_kl_topk(s, top.indices, top.values, labels, tail=tail)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---------------------------------------------------------------- attention maps


def causal_maps(g, b, h, tq, tk, zero_frac=0.0):
    """Random post-softmax causal maps; query i (of the last tq positions) sees keys j <= i + tk - tq."""
    scores = torch.randn(b, h, tq, tk, generator=g)
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    if zero_frac:
        drop = torch.rand(b, h, tq, tk, generator=g) < zero_frac
        drop[..., 0] = False  # key 0 is always visible
        allowed = allowed & ~drop
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("tq,tk", [(6, 6), (3, 7)])
def test_attention_kl_matches_naive_reference(tq, tk):
    g = torch.Generator().manual_seed(5)
    a_s = causal_maps(g, 2, 3, tq, tk)
    a_t = causal_maps(g, 2, 3, tq, tk, zero_frac=0.3)  # exact zeros in A_T beyond the causal mask
    assert (a_t == 0).any()
    query_mask = torch.rand(2, tq, generator=g) < 0.6
    query_mask[0, -1] = True
    got = attention_kl(a_s, a_t, query_mask)
    assert got.item() == pytest.approx(naive_attention_kl(a_s, a_t, query_mask, 1e-10), rel=1e-5)
    assert attention_kl(a_t, a_t, query_mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_hand_checked():
    # One head, one query over two keys: A_T = (1, 0), A_S = (0.5, 0.5): 1 * (ln 1 - ln 0.5) = ln 2
    a_t = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    a_s = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2)
    assert attention_kl(a_s, a_t, torch.tensor([[True]])).item() == pytest.approx(math.log(2), abs=1e-6)
    # A_S = 0 where A_T > 0 is clamped at eps: 1 * (0 - ln 1e-10) = 23.02585
    a_s0 = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    assert attention_kl(a_s0, a_t, torch.tensor([[True]])).item() == pytest.approx(23.02585, rel=1e-6)


def test_attention_kl_sums_average_exactly_over_query_chunks():
    g = torch.Generator().manual_seed(6)
    a_s = causal_maps(g, 2, 2, 6, 6)
    a_t = causal_maps(g, 2, 2, 6, 6)
    a_s.requires_grad_(True)
    query_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    whole = attention_kl(a_s, a_t, query_mask)
    t1, n1 = attention_kl_sums(a_s[:, :, :2], a_t[:, :, :2], query_mask[:, :2])
    t2, n2 = attention_kl_sums(a_s[:, :, 2:], a_t[:, :, 2:], query_mask[:, 2:])
    assert n1 + n2 == 2 * int(query_mask.sum())
    assert ((t1 + t2) / (n1 + n2)).item() == pytest.approx(whole.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(whole, a_s)
    assert torch.isfinite(grad).all()


def test_attention_kl_empty_mask_and_errors():
    g = torch.Generator().manual_seed(7)
    a_s = causal_maps(g, 1, 2, 4, 4).requires_grad_(True)
    a_t = causal_maps(g, 1, 2, 4, 4)
    loss = attention_kl(a_s, a_t, torch.zeros(1, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, a_s)
    assert torch.equal(grad, torch.zeros_like(a_s))
    with pytest.raises(ValueError, match="head counts differ"):
        attention_kl(a_s, causal_maps(g, 1, 4, 4, 4), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_mask"):
        attention_kl(a_s, a_t, torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- chunked LM-head path


D, DT, V, K = 8, 6, 17, 5


def head_setup(seed=8, b=2, t=7, softcap=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, D, generator=g, requires_grad=True)
    head = nn.Linear(D, V, bias=False)
    t_head = nn.Linear(DT, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
        t_head.weight.copy_(torch.randn(V, DT, generator=g))
    t_hidden = torch.randn(b, t, DT, generator=g)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, :3] = -100
    labels[1, 5] = -100
    return hidden, head, t_hidden, t_head, labels


def plain_sums(hidden, head, labels, teacher, divergence, tau, post=None, teacher_post=None, **kw):
    """Reference path: full logits, public mean losses turned back into sums. ``post``/``teacher_post`` are
    (scale, cap) pairs: z * scale, then tanh(z / cap) * cap, written out here."""
    z = head(hidden)
    if post is not None:
        z = torch.tanh(z * post[0] / post[1]) * post[1]
    n = int((labels != -100).sum())
    if teacher is None:
        kd = torch.zeros(())
    elif isinstance(teacher, tuple):
        kd = forward_kl_topk(z, *teacher, labels, temperature=tau, **kw) * n
    else:
        t_z = teacher
        if teacher_post is not None:
            t_z = torch.tanh(t_z * teacher_post[0] / teacher_post[1]) * teacher_post[1]
        kd = DIVERGENCES[divergence](z, t_z, labels, temperature=tau, **kw) * n
    ce = cross_entropy(z, labels) * n
    return kd, ce, n


def grads_of(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, head.weight])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("teacher_kind", ["hidden", "topk", "none"])
def test_chunked_matches_plain_path(chunk_size, teacher_kind, fused):
    hidden, head, t_hidden, t_head, labels = head_setup()
    tau = 2.0
    kwargs = {}
    with torch.no_grad():
        t_logits = t_head(t_hidden)
    if teacher_kind == "hidden":
        kwargs = {"teacher_hidden": t_hidden, "teacher_head": t_head}
        ref_teacher = t_logits
    elif teacher_kind == "topk":
        top = F.log_softmax(t_logits, -1).topk(K, -1)
        kwargs = {"teacher_topk": (top.indices, top.values)}
        ref_teacher = (top.indices, top.values)
    else:
        ref_teacher = None
    out = chunked_head_losses(hidden, head, labels, temperature=tau, chunk_size=chunk_size,
                              kd_weight=0.7, ce_weight=1.0, fused=fused, **kwargs)
    kd, ce, n = plain_sums(hidden, head, labels, ref_teacher, "forward_kl", tau)
    assert out["n_tokens"] == n == 10
    assert out["kd_sum"].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    assert out["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-5)
    loss_c = out["loss_sum"]
    loss_p = ce + 0.7 * kd
    assert loss_c.item() == pytest.approx(loss_p.item(), rel=1e-5)
    for got, want in zip(grads_of(loss_c, hidden, head), grads_of(loss_p, hidden, head)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "tvd"])
def test_chunked_divergences_with_post_head_transforms(divergence, fused):
    """Logit scaling and soft-capping of both heads (Granite, Cohere, Gemma 2): forward KL included, whose
    in-place kernel must then give way to autograd."""
    hidden, head, t_hidden, t_head, labels = head_setup(seed=9)
    kw = DIV_KWARGS[divergence]
    out = chunked_head_losses(
        hidden,
        head,
        labels,
        teacher_hidden=t_hidden,
        teacher_head=t_head,
        divergence=divergence,
        divergence_kwargs=kw,
        chunk_size=3,
        post_head=PostHead(scale=0.5, softcap=5.0),
        teacher_post_head=PostHead(scale=2.0, softcap=4.0),
        fused=fused,
    )
    with torch.no_grad():
        t_logits = t_head(t_hidden)
    kd, ce, _ = plain_sums(
        hidden, head, labels, t_logits, divergence, 1.0, post=(0.5, 5.0), teacher_post=(2.0, 4.0), **kw
    )
    assert out["kd_sum"].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    assert out["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-5)
    for got, want in zip(
        grads_of(out["loss_sum"], hidden, head), grads_of(kd + ce, hidden, head)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_only_response_positions_get_gradient(fused):
    hidden, head, t_hidden, t_head, labels = head_setup()
    out = chunked_head_losses(
        hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=4, fused=fused
    )
    (grad,) = torch.autograd.grad(out["loss_sum"], hidden)
    masked = labels == -100
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    assert (grad[~masked].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_no_masked_tokens_gives_zeros_with_working_backward(fused):
    hidden, head, t_hidden, t_head, _ = head_setup()
    labels = torch.full((2, 7), -100)
    for kwargs in ({"teacher_hidden": t_hidden, "teacher_head": t_head}, {}):
        out = chunked_head_losses(hidden, head, labels, chunk_size=3, fused=fused, **kwargs)
        assert out["n_tokens"] == 0
        assert out["kd_sum"].item() == 0.0 and out["ce_sum"].item() == 0.0 and out["loss_sum"].item() == 0.0
        g_hidden, g_weight = grads_of(out["loss_sum"], hidden, head)
        assert torch.equal(g_hidden, torch.zeros_like(hidden))
        assert torch.equal(g_weight, torch.zeros_like(head.weight))


def test_chunked_validation():
    hidden, head, t_hidden, t_head, labels = head_setup()
    with pytest.raises(ValueError, match="together"):
        chunked_head_losses(hidden, head, labels, teacher_hidden=t_hidden)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_head_losses(
            hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, divergence="kl"
        )
    top = torch.zeros(2, 7, 3, dtype=torch.long), torch.zeros(2, 7, 3)
    with pytest.raises(ValueError, match="forward_kl"):
        chunked_head_losses(hidden, head, labels, teacher_topk=top, divergence="tvd")
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_head_losses(hidden, head, labels, teacher_hidden=t_hidden, teacher_head=nn.Linear(DT, V + 1))


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_never_keeps_vocabulary_sized_tensors_for_backward(fused):
    import weakref

    g = torch.Generator().manual_seed(10)
    n, d, v, chunk = 64, 16, 5000, 8
    hidden = torch.randn(1, n, d, generator=g, requires_grad=True)
    head = nn.Linear(d, v, bias=False)
    t_head = nn.Linear(d, v, bias=False)
    t_hidden = torch.randn(1, n, d, generator=g)
    labels = torch.randint(0, v, (1, n), generator=g)
    saved = []

    def pack(x):
        saved.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = chunked_head_losses(
            hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=chunk, fused=fused
        )
    assert saved, "the hook saw no saved tensors"
    # what the graph still holds once forward has returned (the fused path's per-chunk graphs are gone)
    kept = [t.numel() for ref in saved if (t := ref()) is not None and t.numel() > 0]
    assert max(kept, default=0) < chunk * v  # not even one chunk's logits
    out["loss_sum"].backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


def test_chunked_without_ce_and_under_no_grad():
    hidden, head, t_hidden, t_head, labels = head_setup()
    teacher = {"teacher_hidden": t_hidden, "teacher_head": t_head}
    full = chunked_head_losses(hidden, head, labels, chunk_size=3, **teacher)
    kd_only = chunked_head_losses(hidden, head, labels, chunk_size=3, need_ce=False, **teacher)
    assert kd_only["ce_sum"].item() == 0.0 and not kd_only["ce_sum"].requires_grad
    assert kd_only["kd_sum"].item() == pytest.approx(full["kd_sum"].item(), rel=1e-6)
    with torch.no_grad():  # evaluation: no checkpointing, same numbers
        evaluated = chunked_head_losses(hidden, head, labels, chunk_size=3, **teacher)
    assert evaluated["kd_sum"].item() == pytest.approx(full["kd_sum"].item(), rel=1e-6)
    assert evaluated["ce_sum"].item() == pytest.approx(full["ce_sum"].item(), rel=1e-6)


def test_fused_head_handles_bias_frozen_weight_and_padded_rows():
    """Bias gradients; a frozen head (LoRA-style) gets none; VocabHead's kept rows only; no_grad falls back."""
    from teacherfit.models import VocabHead

    hidden, _, t_hidden, t_head, labels = head_setup(seed=4)
    g = torch.Generator().manual_seed(5)
    head = nn.Linear(hidden.shape[-1], V, bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.randn(V, generator=g))
    teacher = {"teacher_hidden": t_hidden, "teacher_head": t_head}
    fused = chunked_head_losses(hidden, head, labels, chunk_size=4, kd_weight=0.3, ce_weight=0.5, **teacher)
    plain = chunked_head_losses(hidden, head, labels, chunk_size=4, kd_weight=0.3, ce_weight=0.5, fused=False,
                                **teacher)
    params = [hidden, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad(fused["loss_sum"], params), torch.autograd.grad(plain["loss_sum"], params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    head.requires_grad_(False)
    out = chunked_head_losses(hidden, head, labels, chunk_size=4, **teacher)
    (g_hidden,) = torch.autograd.grad(out["loss_sum"], hidden)
    (want,) = torch.autograd.grad(chunked_head_losses(hidden, head, labels, chunk_size=4, fused=False,
                                                      **teacher)["loss_sum"], hidden)
    torch.testing.assert_close(g_hidden, want, rtol=1e-5, atol=1e-6)
    head.requires_grad_(True)

    # padded vocabulary: a head with 3 extra rows, restricted to V; the extra rows get no gradient
    wide = nn.Linear(hidden.shape[-1], V + 3, bias=False)
    padded = VocabHead(wide, V)
    out = chunked_head_losses(hidden, padded, labels, chunk_size=4, **teacher)
    ref = chunked_head_losses(hidden, padded, labels, chunk_size=4, fused=False, **teacher)
    assert out["kd_sum"].item() == pytest.approx(ref["kd_sum"].item(), rel=1e-6)
    got, = torch.autograd.grad(out["loss_sum"], wide.weight)
    want, = torch.autograd.grad(ref["loss_sum"], wide.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[V:], torch.zeros_like(got[V:]))


def test_fused_ce_weight_zero_logs_ce_without_its_gradient():
    hidden, head, t_hidden, t_head, labels = head_setup(seed=6)
    teacher = {"teacher_hidden": t_hidden, "teacher_head": t_head}
    out = chunked_head_losses(hidden, head, labels, chunk_size=3, kd_weight=1.0, ce_weight=0.0, **teacher)
    kd, ce, _ = plain_sums(hidden, head, labels, t_head(t_hidden).detach(), "forward_kl", 1.0)
    assert out["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-5)  # logged
    for got, want in zip(grads_of(out["loss_sum"], hidden, head), grads_of(kd, hidden, head)):  # KD only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("tau", "ce_weight"), [(1.0, 0.4), (2.0, 0.0), (0.5, 0.0)])
def test_fused_forward_kl_kernel_matches_plain_path(monkeypatch, tau, ce_weight):
    """The in-place forward-KL kernel (the default setting) is taken, and equals the plain full-logit path."""
    import teacherfit.distill.losses as losses

    calls = []
    kernel = losses._forward_kl_chunk_grad
    monkeypatch.setattr(losses, "_forward_kl_chunk_grad", lambda *a: calls.append(1) or kernel(*a))
    hidden, head, t_hidden, t_head, labels = head_setup(seed=12)
    out = chunked_head_losses(hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=3,
                              temperature=tau, kd_weight=0.8, ce_weight=ce_weight)
    assert len(calls) == 4  # 10 response tokens in chunks of 3
    kd, ce, _ = plain_sums(hidden, head, labels, t_head(t_hidden).detach(), "forward_kl", tau)
    assert out["kd_sum"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-5)
    for got, want in zip(grads_of(out["loss_sum"], hidden, head), grads_of(0.8 * kd + ce_weight * ce, hidden, head)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_forward_kl_falls_back_on_non_finite_teacher_logits():
    """-inf teacher logits (a banned token) leave the in-place kernel; autograd on the chunk keeps 0 * log 0 = 0."""
    hidden, head, t_hidden, _, labels = head_setup(seed=13)
    t_head = nn.Linear(DT, V, bias=True)
    with torch.no_grad():
        t_head.bias.zero_()
        t_head.bias[2] = float("-inf")
    out = chunked_head_losses(hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=4)
    kd, ce, _ = plain_sums(hidden, head, labels, t_head(t_hidden).detach(), "forward_kl", 1.0)
    assert torch.isfinite(kd) and out["kd_sum"].item() == pytest.approx(kd.item(), rel=1e-5)
    for got, want in zip(grads_of(out["loss_sum"], hidden, head), grads_of(kd + ce, hidden, head)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sampled-token reverse KL (on-policy)


def naive_sampled_rkl(student_logits, teacher_logits, labels):
    """Per sampled token: value log p_S(y) - log p_T(y); gradient of the REINFORCE surrogate
    sum_t stopgrad(r_t) * log p_S(y_t), written as a Python loop over tokens."""
    values, surrogate = [], 0.0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[row, t])
            if y == -100:
                continue
            ls = F.log_softmax(student_logits[row, t].double(), -1)[y]
            lt = F.log_softmax(teacher_logits[row, t].double(), -1)[y]
            r = float((ls - lt).detach())
            values.append(r)
            surrogate = surrogate + r * ls
    return values, surrogate


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("given", ["head", "sampled"])
def test_sampled_reverse_kl_value_and_gradient_match_the_naive_policy_gradient(fused, given):
    torch.manual_seed(3)
    B, T, d, V = 2, 7, 6, 11
    head = nn.Linear(d, V, bias=False)
    t_head = nn.Linear(d, V, bias=False)
    h = torch.randn(B, T, d, requires_grad=True)
    t_h = torch.randn(B, T, d)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    labels[1, 5:] = -100
    # reference on the same leaves
    h_ref = h.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    values, surrogate = naive_sampled_rkl(h_ref @ w_ref.T, (t_h @ t_head.weight.T).detach(), labels)
    surrogate.backward()
    kwargs = dict(teacher_hidden=t_h, teacher_head=t_head)
    if given == "sampled":
        with torch.no_grad():
            t_lp = F.log_softmax(t_head(t_h), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        kwargs = dict(teacher_sampled=t_lp)
    out = chunked_head_losses(h, head, labels, divergence="sampled_reverse_kl", chunk_size=3, ce_weight=0.0,
                              fused=fused, **kwargs)
    assert out["n_tokens"] == len(values)
    assert float(out["kd_sum"]) == pytest.approx(sum(values), rel=1e-5, abs=1e-6)
    out["loss_sum"].backward()
    assert torch.allclose(h.grad, h_ref.grad.float(), atol=1e-5)
    assert torch.allclose(head.weight.grad, w_ref.grad.float(), atol=1e-5)


def test_sampled_reverse_kl_unscored_tokens_have_no_advantage_and_it_refuses_misuse():
    from teacherfit.distill.losses import sampled_token_terms

    logits = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    teacher = torch.tensor([-1.0, float("nan"), -2.0, float("nan")])
    value, surrogate = sampled_token_terms(logits, teacher, y)
    assert value[1] == 0 and value[3] == 0 and value[0] != 0
    surrogate.sum().backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)
    # E_y~p[r * grad log p] is the gradient of KL(p || q): check the estimator's expectation exactly over y
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, dtype=torch.float64).log_softmax(-1)
    p = z.softmax(-1)
    exact = torch.autograd.grad((p * (z.log_softmax(-1) - q)).sum(), z)[0]
    expected = sum(p[k].detach() * torch.autograd.grad(sampled_token_terms(z[None], q[k:k + 1], torch.tensor([k]))[1].sum(),
                                                       z)[0] for k in range(5))
    assert torch.allclose(expected, exact, atol=1e-10)
    head = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="temperature 1"):
        chunked_head_losses(torch.randn(1, 2, 3), head, torch.tensor([[1, 2]]), teacher_sampled=torch.zeros(1, 2),
                            divergence="sampled_reverse_kl", temperature=2.0)
    with pytest.raises(ValueError, match="sampled_reverse_kl only"):
        chunked_head_losses(torch.randn(1, 2, 3), head, torch.tensor([[1, 2]]), teacher_sampled=torch.zeros(1, 2))
