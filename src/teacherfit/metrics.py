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
