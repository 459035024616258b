"""Teacher-selection metrics: CAR and its baselines, rank correlations, bootstrap intervals.

Pure numpy/scipy functions with no model code, so that every number a ranking report shows can be
recomputed from the per-teacher means saved next to it (docs/papers.md section 1).

Which direction is "better" differs between metrics; ``METRIC_DIRECTION`` records the convention
teacherfit uses when it ranks teachers by a metric. Correlation helpers report raw correlations:
multiply a metric by its direction first if a positive rho should mean "ranks teachers the right way".
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from teacherfit.config import DEFAULT_BETA

POSITIVE_REWARD_FLOOR: float = 0.1
"""Score given to the lowest reward by ``positive_rewards`` (the highest gets 1 + floor).

Not 0, so the worst-reward teacher's loss still matters; small, so the map keeps most of the
reward spread. With 0.1 the best/worst ratio of mapped rewards is 11.
"""

DEFAULT_BETA_GRID: np.ndarray = np.concatenate([[0.0], np.geomspace(0.01, 100.0, 41)])
"""Betas tried by ``calibrate_beta``: 0 (reward alone) plus a log grid, 10 points per decade."""

METRIC_DIRECTION: dict[str, int] = {
    "car": +1,  # higher reward per unit of risk
    "reward": +1,  # reward-model quality score
    # Longer responses predicted better students in the paper (rho with AP about +0.59 on all
    # five bases), which is what a length-biased judge would also reward.
    "length": +1,
    # Lower loss / perplexity under the student = responses the student already finds likely,
    # the "compatibility" that CAR rewards.
    "loss_student": -1,
    "ppl_student": -1,
    "ppl_ref": -1,
    # IFD = PPL(response | instruction) / PPL(response); lower means the instruction explains more
    # of the response. (Instruction-data filtering, where IFD was introduced, prefers *high* IFD
    # samples as harder; the paper's sign convention for IFD as a teacher metric is not confirmed.)
    "ifd_student": -1,
    "ifd_ref": -1,
    # GRAPE (Zhang et al. 2025): the share of instructions on which the student finds this teacher's response the
    # most likely of all candidates (length-normalised log-probability); its per-teacher mean log-probability is
    # -loss_student, listed above.
    "grape": +1,
    # GRACE (Panigrahi et al. 2026): cross-validated trace(Sigma_train^-1 Sigma_test) of the student's projected
    # per-example gradients, a leave-one-out-stability (generalisation) bound: lower is better.
    "grace": -1,
    # the reward, and CAR with it, under a second, different judge (`rank.reward_2`)
    "reward_2": +1,
    "car_2": +1,
}
"""+1: a higher value should mean a better teacher; -1: a lower value should."""

# The paper's Table 4 (Spearman rho of each metric with AP over 19 open teachers), as in docs/papers.md section 1.5.
_TABLE4_METRICS = (
    "ArmoRM", "Sky-8B", "Sky-27B", "IFD-GPT2", "IFD-self", "PPL-GPT2", "PPL-self", "length", "CAR",
)
_TABLE4_ROWS = {
    "Qwen2-1.5B": (0.553, 0.790, 0.875, 0.709, 0.772, 0.147, 0.560, 0.540, 0.884),
    "Gemma-2-2B": (0.553, 0.798, 0.884, 0.828, 0.893, 0.161, 0.435, 0.630, 0.900),
    "Qwen2.5-3B": (0.453, 0.735, 0.746, 0.739, 0.809, 0.046, -0.061, 0.609, 0.811),
    "Llama-3.2-3B": (0.609, 0.811, 0.909, 0.763, 0.858, 0.046, 0.602, 0.588, 0.905),
    "Minitron-4B": (0.663, 0.886, 0.939, 0.749, 0.856, 0.158, 0.626, 0.581, 0.944),
    "mean": (0.566, 0.804, 0.871, 0.758, 0.837, 0.112, 0.432, 0.590, 0.889),
}
PAPER_TABLE4: dict[str, dict[str, float]] = {
    base: dict(zip(_TABLE4_METRICS, values, strict=True)) for base, values in _TABLE4_ROWS.items()
}
"""Base model -> metric -> Spearman rho with AP, as published (the "mean" row is the paper's own)."""


def _as_float_or_array(value: np.ndarray) -> float | np.ndarray:
    """Scalars in, float out; arrays in, array out (keeps call sites free of ``float(...)``)."""
    return float(value) if np.ndim(value) == 0 else value


def car(reward, loss, beta: float = DEFAULT_BETA):
    """Compatibility-Adjusted Reward: ``reward / (1 + beta * loss)``. Higher is better.

    ``loss`` is the untuned student's mean token NLL on the teacher's responses (>= 0). With a
    negative reward the division *favours* higher loss; use ``car_sign_safe`` for such reward
    models (``car_variant_for`` picks). Scalars give a float, arrays or lists an array.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    reward = np.asarray(reward, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if np.any(loss < 0):
        raise ValueError("loss must be >= 0 (a mean negative log-likelihood)")
    return _as_float_or_array(reward / (1.0 + beta * loss))


def positive_rewards(rewards, *, floor: float = POSITIVE_REWARD_FLOOR) -> np.ndarray:
    """Map rewards across the candidate set onto ``[floor, 1 + floor]``, keeping their order.

    ``(r - min) / (max - min) + floor``: affine and increasing, so it ranks teachers exactly as the
    reward does, but every value is positive, which is what CAR's division needs. The map depends
    on the candidate set (adding a teacher can move the others' scores), and it is independent of
    the reward model's offset and scale. All-equal rewards map to ones: reward then cannot
    separate the teachers and CAR ranks them by loss alone.
    """
    return positive_reward_map(rewards, floor=floor)(np.asarray(rewards, dtype=float))


def positive_reward_map(rewards, *, floor: float = POSITIVE_REWARD_FLOOR) -> Callable[[np.ndarray], np.ndarray]:
    """The affine map of ``positive_rewards`` fixed on a candidate set, to apply to other values.

    Bootstrap resamples must be mapped with the map of the point estimates, not re-normalised each
    time; a resampled mean below the set's minimum can fall under ``floor``, so mapped values are
    clipped at ``floor / 100`` to stay positive.
    """
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    r = np.asarray(rewards, dtype=float)
    if r.ndim != 1 or r.size == 0:
        raise ValueError("rewards must be a non-empty 1-D sequence (one value per candidate teacher)")
    low, span = r.min(), r.max() - r.min()
    if span == 0:
        return lambda x: np.ones_like(np.asarray(x, dtype=float))
    return lambda x: np.maximum((np.asarray(x, dtype=float) - low) / span + floor, floor / 100)


def car_sign_safe(
    reward, loss, beta: float = DEFAULT_BETA, *, floor: float = POSITIVE_REWARD_FLOOR
) -> np.ndarray:
    """CAR on ``positive_rewards(reward)``: defined across a candidate set, so arrays only.

    At equal loss it keeps the reward order; at equal reward, lower loss always wins, whatever the
    sign of the raw rewards.
    """
    return np.asarray(car(positive_rewards(reward, floor=floor), loss, beta))


def car_variant_for(rewards) -> str:
    """``"plain"`` if every reward is > 0 (CAR as published), else ``"sign_safe"``."""
    return "plain" if np.all(np.asarray(rewards, dtype=float) > 0) else "sign_safe"


def car_pick_probabilities(
    rewards,
    losses,
    beta: float = DEFAULT_BETA,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How sure the CAR ranking is: a paired bootstrap over instructions.

    ``rewards`` and ``losses`` are (teachers x instructions), every teacher answering the same instructions in the
    same column order (NaN where a score is missing: left out of that teacher's means). Each resample draws the
    instruction columns with replacement, the same columns for every teacher (their responses answer the same
    prompts, so their errors are paired), and computes each teacher's CAR of the resampled means, as the point
    estimate is computed. Returns the point CARs, the ``leader`` and ``runner_up`` (by point CAR), ``p_best``
    (per teacher, the share of resamples where it has the highest CAR) and ``p_leader_beats_runner_up``.
    """
    r = np.asarray(rewards, dtype=float)
    l = np.asarray(losses, dtype=float)
    if r.ndim != 2 or r.shape != l.shape or r.shape[0] < 2 or r.shape[1] < 1:
        raise ValueError("rewards and losses must be (teachers x instructions) with at least 2 teachers")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    transform = transform or (lambda x: x)
    ok = np.isfinite(r) & np.isfinite(l)
    r, l = np.where(ok, r, np.nan), np.where(ok, l, np.nan)

    def cars(rr: np.ndarray, ll: np.ndarray) -> np.ndarray:  # (..., teachers, instructions) -> (..., teachers)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resampled rows: NaN CAR, never best
            return np.asarray(transform(np.nanmean(rr, axis=-1))) / (1.0 + beta * np.nanmean(ll, axis=-1))

    point = cars(r, l)
    order = np.argsort(np.where(np.isfinite(point), -point, np.inf), kind="stable")
    leader, runner_up = int(order[0]), int(order[1])
    idx = np.random.default_rng(seed).integers(0, r.shape[1], size=(n_resamples, r.shape[1]))
    boot = cars(r[:, idx].transpose(1, 0, 2), l[:, idx].transpose(1, 0, 2))  # (resamples, teachers)
    best = np.argmax(np.where(np.isfinite(boot), boot, -np.inf), axis=1)
    p_best = np.bincount(best, minlength=r.shape[0]) / n_resamples
    beats = np.nan_to_num(boot[:, leader], nan=-np.inf) > np.nan_to_num(boot[:, runner_up], nan=-np.inf)
    return {"car": point.tolist(), "leader": leader, "runner_up": runner_up, "p_best": p_best.tolist(),
            "p_leader_beats_runner_up": float(beats.mean()), "n_resamples": n_resamples}


def grape_selection(logprobs) -> dict[str, Any]:
    """GRAPE's rule (Zhang, Dai, Peng 2025): per instruction, the candidate response with the highest
    length-normalised log-probability under the student (mean log-probability per response token).

    ``logprobs`` is (teachers x instructions), NaN where a teacher has no scored response to an instruction (it
    cannot win there). Returns ``winner`` (per instruction, the row index of the winning teacher, -1 where no
    teacher was scored; ties go to the first teacher), ``win_share`` (per teacher, its wins over the instructions
    that have a winner; these sum to 1) and ``mean_logprob`` (per teacher, over its scored instructions).
    """
    lp = np.asarray(logprobs, dtype=float)
    if lp.ndim != 2 or lp.shape[0] < 1:
        raise ValueError("logprobs must be (teachers x instructions)")
    scored = np.isfinite(lp)
    has_winner = scored.any(axis=0)
    winner = np.where(has_winner, np.argmax(np.where(scored, lp, -np.inf), axis=0), -1)
    wins = np.bincount(winner[has_winner], minlength=lp.shape[0])
    decided = int(has_winner.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a teacher with no scored response: NaN mean
        mean = np.nanmean(lp, axis=1)
    return {"winner": winner.tolist(), "win_share": (wins / decided if decided else np.full(lp.shape[0], np.nan)).tolist(),
            "mean_logprob": mean.tolist(), "decided": decided}


GRACE_DEFAULTS = {"test_fraction": 0.1, "n_splits": 10, "smooth": 1e-3}
"""The public GRACE code's defaults (github abhishekpanigrahi1996/GRACE, GRACE/GRACE_computation.py)."""


def grace_score(gradients, *, group_size: int = 1, test_fraction: float = 0.1, n_splits: int = 10,
                smooth: float = 1e-3, eps: float = 1e-12) -> float:
    """GRACE (Panigrahi, Liu, Malladi, Kakade, Goel, ICLR 2026) of one teacher from the student's projected
    per-example gradients on its responses, ``gradients`` (n x d). Lower is better.

    As the authors' code computes it: the rows are grouped by prompt (``group_size`` consecutive rows answer one
    prompt); for each of ``n_splits`` random splits (split ``k`` permutes the prompts with
    ``np.random.default_rng(k)``), ``max(1, int(prompts * test_fraction))`` prompts are held out. The training
    rows are normalised to unit length (direction only), the held-out rows are not (their magnitude counts);
    each side's second moment is ``G^T G / rows``. The training moment's eigenvalues are clipped at ``eps`` and
    smoothed towards their mean, ``(1 - smooth) * w + smooth * mean(w)`` (the spectrum-weighted preconditioner),
    and the split's score is ``trace(inverse(train moment) @ held-out moment)``: large when held-out gradients
    point where the training gradients seldom do (little direction diversity) or are large. The mean over the
    splits is returned.
    """
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"gradients must be (examples x dim) with at least 2 rows, got shape {g.shape}")
    if group_size < 1 or g.shape[0] % group_size:
        raise ValueError(f"{g.shape[0]} rows do not split into groups of {group_size}")
    if not 0 < test_fraction < 1 or n_splits < 1 or not 0 <= smooth <= 1:
        raise ValueError("need 0 < test_fraction < 1, n_splits >= 1 and 0 <= smooth <= 1")
    n_prompts, dim = g.shape[0] // group_size, g.shape[1]
    n_test = max(1, int(n_prompts * test_fraction))
    if n_prompts - n_test < 1:
        raise ValueError(f"{n_prompts} prompts leave none to train on with test_fraction={test_fraction}")
    grouped = g.reshape(n_prompts, group_size, dim)
    scores = []
    for split in range(n_splits):
        order = np.random.default_rng(split).permutation(n_prompts)
        train = grouped[order[: n_prompts - n_test]].reshape(-1, dim)
        test = grouped[order[n_prompts - n_test:]].reshape(-1, dim)
        train = train / np.clip(np.linalg.norm(train, axis=1, keepdims=True), eps, None)
        w, v = np.linalg.eigh(train.T @ train / len(train))
        w = np.clip(w, eps, None)
        w = np.clip((1.0 - smooth) * w + smooth * w.mean(), eps, None)
        scores.append(float(np.trace((v / w) @ v.T @ (test.T @ test / len(test)))))
    return float(np.mean(scores))


def pick_regret(scores: dict[str, float], outcomes: dict[str, float], direction: int = 1) -> dict[str, Any]:
    """What choosing by a metric cost: the teacher the metric ranks first (``direction`` * score highest, ties to
    the first) against the teacher whose student came out best. ``regret`` = best outcome - the pick's outcome
    (0: the metric found the best teacher). Teachers without a finite score or outcome are left out."""
    names = [t for t in scores if t in outcomes and np.isfinite(scores[t]) and np.isfinite(outcomes[t])]
    if not names:
        return {"pick": None, "best": None, "regret": float("nan"), "pick_rank": None}
    pick = max(names, key=lambda t: direction * scores[t])
    best = max(names, key=lambda t: outcomes[t])
    order = sorted(names, key=lambda t: -outcomes[t])
    return {"pick": pick, "best": best, "regret": float(outcomes[best] - outcomes[pick]),
            "pick_rank": order.index(pick) + 1, "of": len(names)}


def critical_correlation(n: int, method: str = "spearman", alpha: float = 0.05) -> float:
    """The smallest |correlation| that is significant (two-sided, level ``alpha``) for ``n`` teachers.

    Spearman: the t-approximation, ``r = t / sqrt(n - 2 + t^2)`` with t the ``1 - alpha/2`` quantile of Student's t
    with n - 2 degrees of freedom; Kendall: the normal approximation, ``z * sqrt(2(2n + 5) / (9n(n - 1)))``. Both
    are the textbook large-sample forms (about right from n = 10 on); NaN below 3 teachers.
    """
    if n < 3:
        return float("nan")
    if method == "spearman":
        t = stats.t.ppf(1 - alpha / 2, n - 2)
        return float(t / np.sqrt(n - 2 + t * t))
    if method == "kendall":
        return float(stats.norm.ppf(1 - alpha / 2) * np.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))))
    raise ValueError(f"method must be 'spearman' or 'kendall', got {method!r}")


def perplexity(mean_nll):
    """``exp(mean NLL)``; lower means the model finds the text more likely."""
    return _as_float_or_array(np.exp(np.asarray(mean_nll, dtype=float)))


def ifd(loss_conditioned, loss_unconditioned):
    """Instruction-following difficulty, ``PPL(response | instruction) / PPL(response)``.

    Computed as ``exp(Lc - Lu)`` from the two mean NLLs, which is the same ratio without
    overflowing. Below 1 when the instruction makes the response more likely; see
    ``METRIC_DIRECTION`` for the direction used when ranking.
    """
    lc = np.asarray(loss_conditioned, dtype=float)
    lu = np.asarray(loss_unconditioned, dtype=float)
    return _as_float_or_array(np.exp(lc - lu))


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D and the same length, got shapes {x.shape} and {y.shape}")
    return x, y


def _rank_corr(scipy_fn: Callable, x, y) -> float:
    x, y = _paired(x, y)
    if x.size < 2:
        return float("nan")
    # Constant input has no defined rank correlation: return nan quietly, as documented.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(scipy_fn(x, y).statistic)


def spearman(x, y) -> float:
    """Spearman's rho (average ranks for ties); nan for fewer than 2 points or a constant input."""
    return _rank_corr(stats.spearmanr, x, y)


def kendall(x, y) -> float:
    """Kendall's tau-b (tie-corrected); nan for fewer than 2 points or a constant input."""
    return _rank_corr(stats.kendalltau, x, y)


_CORRELATIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "spearman": spearman,
    "kendall": kendall,
}


def _correlation(method: str) -> Callable[[Sequence[float], Sequence[float]], float]:
    try:
        return _CORRELATIONS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(_CORRELATIONS)}, got {method!r}") from None


def _percentile_bootstrap(
    n: int, stat_of: Callable[[np.ndarray], float], n_resamples: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of ``stat_of(indices)`` over ``n_resamples`` resamples of ``range(n)``.

    Written here rather than with ``scipy.stats.bootstrap`` because a rank correlation of a small
    resample is often undefined (all resampled x equal), and scipy lets one such nan turn the whole
    interval into nan; here undefined resamples are left out.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    resampled = np.array([stat_of(row) for row in indices], dtype=float)
    resampled = resampled[~np.isnan(resampled)]
    if resampled.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values,
    stat: Callable[[np.ndarray], float] = np.mean,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(stat(values), low, high)``: percentile bootstrap interval, deterministic for a seed."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    low, high = _percentile_bootstrap(v.size, lambda idx: stat(v[idx]), n_resamples, level, seed)
    return float(stat(v)), low, high


def bootstrap_corr_ci(
    x, y, method: str = "spearman", *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(corr(x, y), low, high)`` with (x, y) pairs resampled together (percentile bootstrap).

    With a handful of teachers these intervals are wide; that is the honest answer, not a bug.
    """
    corr = _correlation(method)
    x, y = _paired(x, y)
    if x.size == 0:
        raise ValueError("x and y must not be empty")
    low, high = _percentile_bootstrap(x.size, lambda idx: corr(x[idx], y[idx]), n_resamples, level, seed)
    return corr(x, y), low, high


def paired_corr_difference(x1, x2, y, *, n_resamples: int = 1000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float, float]:
    """``(spearman(x1, y) - spearman(x2, y), low, high)``: is metric 1 a better predictor than metric 2 on these
    teachers? The interval resamples teachers (x1, x2, y together), so both correlations see the same teachers."""
    x1, y = _paired(x1, y)
    x2, _ = _paired(x2, y)
    keep = np.isfinite(x1) & np.isfinite(x2) & np.isfinite(y)
    x1, x2, y = x1[keep], x2[keep], y[keep]
    if x1.size < 2:
        return float("nan"), float("nan"), float("nan")
    diff = lambda idx: spearman(x1[idx], y[idx]) - spearman(x2[idx], y[idx])  # noqa: E731
    low, high = _percentile_bootstrap(x1.size, diff, n_resamples, level, seed)
    return diff(np.arange(x1.size)), low, high


def pooled_correlation(xs, ys, method: str = "spearman", *, n_resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """The mean over groups (students) of corr(x_g, y_g) (``method``: spearman or kendall), every group over the
    same teachers in the same order;
    the interval resamples teachers, the same ones for every group (their responses, hence their errors, are
    shared). Teachers with a non-finite value in a group are left out of that group's correlation."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.ndim != 2 or x.shape != y.shape or x.shape[1] < 2:
        raise ValueError("xs and ys must be (groups x teachers) with at least 2 teachers")

    corr = _correlation(method)

    def mean_rho(idx: np.ndarray) -> float:
        rhos = []
        for xg, yg in zip(x[:, idx], y[:, idx]):
            ok = np.isfinite(xg) & np.isfinite(yg)
            rhos.append(corr(xg[ok], yg[ok]))
        rhos = np.asarray(rhos)
        return float(np.mean(rhos)) if np.all(np.isfinite(rhos)) else float("nan")

    low, high = _percentile_bootstrap(x.shape[1], mean_rho, n_resamples, level, seed)
    return mean_rho(np.arange(x.shape[1])), low, high


def calibrate_beta(rewards, losses, outcomes, *, grid=None, method: str = "spearman") -> float:
    """The beta on ``grid`` whose CAR correlates best with observed ``outcomes``.

    Ties (common: rank correlations change only when the CAR ranking does) go to the smallest
    beta. Uses ``car_sign_safe`` when any reward is <= 0 (``car_variant_for``). Outcomes are the
    students' scores after fine-tuning on each teacher; judging CAR with a beta fitted on the same
    teachers overstates it, so report ``loo_calibrated_car`` instead.
    """
    corr = _correlation(method)
    r, l = _paired(rewards, losses)
    _, y = _paired(r, outcomes)
    betas = np.sort(np.asarray(DEFAULT_BETA_GRID if grid is None else grid, dtype=float))
    if betas.size == 0:
        raise ValueError("grid must contain at least one beta")
    score_fn = car_sign_safe if car_variant_for(r) == "sign_safe" else car
    best_beta, best_corr = None, -np.inf
    for beta in betas:
        c = corr(score_fn(r, l, beta), y)
        if c > best_corr:  # strict: the first (smallest) beta wins ties; nan never wins
            best_beta, best_corr = float(beta), c
    if best_beta is None:
        raise ValueError("no beta gives a defined correlation (are the outcomes or CAR values constant?)")
    return best_beta


def loo_calibrated_car(rewards, losses, outcomes, *, grid=None, method: str = "spearman") -> dict:
    """Leave-one-out calibrated CAR, so the reported correlation is not fitted to the teachers it judges.

    For each teacher i, beta_i is calibrated on the other teachers and teacher i's CAR is computed
    with beta_i; ``corr_loo`` correlates these held-out CARs with the outcomes. For the sign-safe
    variant, rewards are mapped to the positive scale once across the full candidate set (rewards
    are inputs, not outcomes, so this leaks nothing) and every fold uses that map.

    Returns ``{"beta_full", "betas_loo", "car_loo", "corr_loo", "variant"}``.
    """
    r, l = _paired(rewards, losses)
    _, y = _paired(r, outcomes)
    if r.size < 3:
        raise ValueError(f"leave-one-out calibration needs at least 3 teachers, got {r.size}")
    variant = car_variant_for(r)
    scores = positive_rewards(r) if variant == "sign_safe" else r
    betas, cars = [], []
    for i in range(r.size):
        others = np.arange(r.size) != i
        beta_i = calibrate_beta(scores[others], l[others], y[others], grid=grid, method=method)
        betas.append(beta_i)
        cars.append(car(scores[i], l[i], beta_i))
    return {
        "beta_full": calibrate_beta(r, l, y, grid=grid, method=method),
        "betas_loo": betas,
        "car_loo": cars,
        "corr_loo": _correlation(method)(cars, y),
        "variant": variant,
    }


def correlate_metrics(
    metrics: dict[str, Sequence[float]], outcomes: Sequence[float], *, n_resamples: int = 1000, seed: int = 0
) -> list[dict]:
    """Rank correlation of each metric with the outcomes, one row per metric in the given order.

    Rows: ``{"metric", "spearman", "spearman_low", "spearman_high", "kendall", "n"}`` with a 95%
    bootstrap interval for Spearman. Teachers where the metric or the outcome is not finite (not
    measured) are left out of that metric's row; ``n`` counts the teachers used. Correlations are
    raw: orient metrics with ``METRIC_DIRECTION`` first to read positive as "agrees".
    """
    y_all = np.asarray(outcomes, dtype=float)
    rows = []
    for name, values in metrics.items():
        x, y = _paired(values, y_all)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size == 0:
            rho, low, high = float("nan"), float("nan"), float("nan")
        else:
            rho, low, high = bootstrap_corr_ci(x, y, "spearman", n_resamples=n_resamples, seed=seed)
        rows.append(
            {
                "metric": name,
                "spearman": rho,
                "spearman_low": low,
                "spearman_high": high,
                "kendall": kendall(x, y),
                "n": int(x.size),
            }
        )
    return rows
