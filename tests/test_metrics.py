"""metrics: each function against a naive reference written out here, hand-checked numbers, invariants."""

import math
import warnings

import numpy as np
import pytest

from teacherfit import metrics
from teacherfit.metrics import (
    DEFAULT_BETA,
    METRIC_DIRECTION,
    PAPER_TABLE4,
    bootstrap_ci,
    bootstrap_corr_ci,
    calibrate_beta,
    car,
    car_sign_safe,
    car_variant_for,
    correlate_metrics,
    ifd,
    kendall,
    loo_calibrated_car,
    perplexity,
    positive_rewards,
    spearman,
)

# ---------------------------------------------------------------- naive references


def naive_car(rewards, losses, beta):
    return [r / (1 + beta * l) for r, l in zip(rewards, losses)]


def naive_average_ranks(values):
    """Rank 1 = smallest; tied values share the mean of the ranks they occupy."""
    ranks = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def naive_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def naive_spearman(x, y):
    return naive_pearson(naive_average_ranks(x), naive_average_ranks(y))


def naive_kendall_tau_b(x, y):
    concordant = discordant = tied_x = tied_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                tied_x += 1  # includes pairs tied in both
            if dy == 0:
                tied_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) / 2
    return (concordant - discordant) / math.sqrt((pairs - tied_x) * (pairs - tied_y))


@pytest.fixture
def teachers():
    """Eight teachers with positive rewards, and outcomes loosely following CAR."""
    rng = np.random.default_rng(7)
    rewards = rng.uniform(0.5, 2.0, 8)
    losses = rng.uniform(0.3, 2.0, 8)
    outcomes = np.asarray(car(rewards, losses, 1.5)) + rng.normal(0, 0.05, 8)
    return rewards, losses, outcomes


# ---------------------------------------------------------------- CAR


def test_car_hand_checked_and_types():
    assert car(2.0, 1.0, 1.0) == 1.0
    assert car(3.0, 0.5, 2.0) == pytest.approx(1.5)
    assert isinstance(car(2.0, 1.0), float)
    out = car([2.0, 4.0], [1.0, 3.0], beta=1.0)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [1.0, 1.0])


def test_car_matches_naive_formula(teachers):
    rewards, losses, _ = teachers
    for beta in (0.0, 0.3, DEFAULT_BETA, 7.0):
        np.testing.assert_allclose(car(rewards, losses, beta), naive_car(rewards, losses, beta), rtol=1e-12)


def test_car_beta_zero_is_reward(teachers):
    rewards, losses, _ = teachers
    np.testing.assert_array_equal(car(rewards, losses, 0.0), rewards)


def test_car_monotone_for_positive_rewards():
    rewards = np.linspace(0.1, 3.0, 30)
    losses = np.linspace(0.0, 4.0, 30)
    for beta in (0.1, 1.0, 10.0):
        assert np.all(np.diff(car(rewards, 1.0, beta)) > 0)  # increasing in reward
        assert np.all(np.diff(car(1.5, losses, beta)) < 0)  # decreasing in loss


def test_car_rejects_negative_beta_and_loss():
    with pytest.raises(ValueError, match="beta"):
        car(1.0, 1.0, beta=-0.1)
    with pytest.raises(ValueError, match="loss"):
        car([1.0, 1.0], [0.5, -0.5])


def test_positive_rewards_is_the_documented_affine_map():
    r = [-3.0, -1.0, 1.0]
    np.testing.assert_allclose(positive_rewards(r), [0.1, 0.6, 1.1])
    np.testing.assert_allclose(positive_rewards(r, floor=0.01), [0.01, 0.51, 1.01])
    np.testing.assert_array_equal(positive_rewards([-2.0, -2.0, -2.0]), [1.0, 1.0, 1.0])
    # invariant to the reward model's offset and scale
    np.testing.assert_allclose(positive_rewards(np.array(r) * 5 + 40), positive_rewards(r))


def test_positive_rewards_is_positive_and_keeps_order():
    r = np.random.default_rng(0).normal(-1.0, 2.0, 20)
    p = positive_rewards(r)
    assert np.all(p > 0)
    np.testing.assert_array_equal(np.argsort(p), np.argsort(r))


def test_sign_safe_keeps_reward_order_at_equal_loss():
    r = np.array([-2.5, 0.3, -0.7, 1.9, -4.0])
    scores = car_sign_safe(r, np.full(5, 1.2), beta=3.0)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(r))


def test_sign_safe_fixes_negative_reward_pathology():
    # Teachers 0 and 1 have the same negative reward; teacher 1 is far more compatible (lower loss).
    rewards = np.array([-1.0, -1.0, 0.5])
    losses = np.array([2.0, 0.5, 1.0])
    plain = car(rewards, losses, 1.0)
    assert plain[0] > plain[1]  # plain CAR prefers the higher-loss teacher: -1/3 > -1/1.5
    safe = car_sign_safe(rewards, losses, 1.0)
    assert safe[1] > safe[0]
    np.testing.assert_allclose(safe, naive_car([0.1, 0.1, 1.1], losses, 1.0))


def test_car_variant_for():
    assert car_variant_for([0.2, 1.0, 3.0]) == "plain"
    assert car_variant_for([0.2, 0.0, 3.0]) == "sign_safe"
    assert car_variant_for([-0.2, 1.0]) == "sign_safe"


# ---------------------------------------------------------------- PPL and IFD


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    np.testing.assert_allclose(perplexity([0.0, 1.0]), [1.0, math.e])


def test_ifd_hand_checked_and_is_a_ratio_of_perplexities():
    assert ifd(1.0, 2.0) == pytest.approx(math.exp(-1.0))
    assert isinstance(ifd(1.0, 2.0), float)
    lc, lu = np.array([0.8, 1.9, 2.2]), np.array([1.1, 1.9, 1.0])
    naive = [math.exp(a) / math.exp(b) for a, b in zip(lc, lu)]
    np.testing.assert_allclose(ifd(lc, lu), naive, rtol=1e-12)


# ---------------------------------------------------------------- correlations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_kendall_match_naive_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 15).astype(float)  # many ties
    y = x + rng.integers(-2, 3, 15)
    assert spearman(x, y) == pytest.approx(naive_spearman(list(x), list(y)), abs=1e-12)
    assert kendall(x, y) == pytest.approx(naive_kendall_tau_b(list(x), list(y)), abs=1e-12)


def test_correlations_hand_checked():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair among 4: 5 concordant, 1 discordant -> tau = 4/6; rho = 1 - 6*2/(4*15) = 0.8
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_correlations_undefined_cases_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (spearman, kendall):
            assert math.isnan(fn([1.0], [2.0]))
            assert math.isnan(fn([], []))
            assert math.isnan(fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
            assert math.isnan(fn([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))


def test_correlations_reject_unequal_lengths():
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_deterministic_and_contains_the_estimate():
    values = np.random.default_rng(3).normal(10.0, 2.0, 200)
    point, low, high = bootstrap_ci(values, seed=5)
    assert point == pytest.approx(values.mean())
    assert low < point < high
    assert bootstrap_ci(values, seed=5) == (point, low, high)
    assert bootstrap_ci(values, seed=6) != (point, low, high)
    # the percentile interval of a mean is close to the normal-theory one
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert high - low == pytest.approx(2 * half, rel=0.2)


def test_bootstrap_ci_other_stat_and_level():
    values = np.arange(50.0)
    point, low95, high95 = bootstrap_ci(values, np.median, seed=0)
    assert point == 24.5
    _, low50, high50 = bootstrap_ci(values, np.median, level=0.5, seed=0)
    assert low95 <= low50 <= point <= high50 <= high95
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=1.5)


def test_bootstrap_corr_ci_resamples_pairs(teachers):
    rewards, losses, outcomes = teachers
    x = car(rewards, losses, 1.5)
    rho, low, high = bootstrap_corr_ci(x, outcomes, seed=1)
    assert rho == spearman(x, outcomes)
    assert low <= rho <= high <= 1.0
    assert bootstrap_corr_ci(x, outcomes, seed=1) == (rho, low, high)
    tau, tlow, thigh = bootstrap_corr_ci(x, outcomes, "kendall", seed=1)
    assert tau == kendall(x, outcomes) and tlow <= tau <= thigh
    # a perfectly monotone relation stays perfect in every resample that is defined
    assert bootstrap_corr_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        bootstrap_corr_ci(x, outcomes, "pearson")


# ---------------------------------------------------------------- calibration


def test_calibrate_beta_recovers_generating_beta(teachers):
    rewards, losses, _ = teachers
    outcomes = car(rewards, losses, beta=2.0)
    assert spearman(rewards, outcomes) < 1.0  # reward alone does not explain the outcomes
    beta = calibrate_beta(rewards, losses, outcomes)
    assert spearman(car(rewards, losses, beta), outcomes) == pytest.approx(1.0)
    beta_tau = calibrate_beta(rewards, losses, outcomes, method="kendall")
    assert kendall(car(rewards, losses, beta_tau), outcomes) == pytest.approx(1.0)


def test_calibrate_beta_matches_naive_grid_search_and_breaks_ties_low(teachers):
    rewards, losses, outcomes = teachers
    grid = [5.0, 0.0, 0.5, 1.0, 2.0]  # unsorted on purpose
    best, best_rho = None, -2.0
    for beta in sorted(grid):
        rho = naive_spearman(naive_car(rewards, losses, beta), list(outcomes))
        if rho > best_rho + 1e-12:
            best, best_rho = beta, rho
    assert calibrate_beta(rewards, losses, outcomes, grid=grid) == best
    # outcomes ranked exactly like reward: every small enough beta ties, and 0 is chosen
    assert calibrate_beta(rewards, losses, rewards * 3) == 0.0


def test_calibrate_beta_uses_sign_safe_for_non_positive_rewards():
    rng = np.random.default_rng(11)
    rewards = rng.normal(0.0, 1.0, 10)
    losses = rng.uniform(0.3, 2.0, 10)
    outcomes = car_sign_safe(rewards, losses, beta=2.0)
    beta = calibrate_beta(rewards, losses, outcomes)
    assert spearman(car_sign_safe(rewards, losses, beta), outcomes) == pytest.approx(1.0)


def test_calibrate_beta_rejects_constant_outcomes(teachers):
    rewards, losses, _ = teachers
    with pytest.raises(ValueError, match="defined correlation"):
        calibrate_beta(rewards, losses, np.ones(rewards.size))


def test_loo_calibrated_car_shapes_and_values(teachers):
    rewards, losses, outcomes = teachers
    grid = [0.0, 0.5, 1.0, 2.0, 4.0]
    out = loo_calibrated_car(rewards, losses, outcomes, grid=grid)
    n = rewards.size
    assert len(out["betas_loo"]) == n and len(out["car_loo"]) == n
    assert out["beta_full"] == calibrate_beta(rewards, losses, outcomes, grid=grid)
    assert out["variant"] == "plain"
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        beta_i = calibrate_beta(rewards[keep], losses[keep], outcomes[keep], grid=grid)
        assert out["betas_loo"][i] == beta_i
        assert out["car_loo"][i] == pytest.approx(rewards[i] / (1 + beta_i * losses[i]))
    assert out["corr_loo"] == pytest.approx(naive_spearman(out["car_loo"], list(outcomes)))


def test_loo_sign_safe_maps_rewards_once_across_all_teachers():
    rewards = np.array([-1.0, 0.5, -0.2, 2.0, 1.0])
    losses = np.array([0.5, 1.5, 0.8, 2.0, 0.9])
    outcomes = np.array([0.1, 0.4, 0.3, 0.6, 0.9])
    out = loo_calibrated_car(rewards, losses, outcomes, grid=[0.0, 1.0, 3.0])
    assert out["variant"] == "sign_safe"
    mapped = positive_rewards(rewards)
    for i, beta_i in enumerate(out["betas_loo"]):
        assert out["car_loo"][i] == pytest.approx(mapped[i] / (1 + beta_i * losses[i]))


def test_loo_needs_three_teachers():
    with pytest.raises(ValueError, match="at least 3"):
        loo_calibrated_car([1.0, 2.0], [0.5, 0.6], [0.1, 0.2])


# ---------------------------------------------------------------- correlate_metrics


def test_correlate_metrics_rows(teachers):
    rewards, losses, outcomes = teachers
    table = {"car": car(rewards, losses), "reward": rewards, "loss_student": losses}
    rows = correlate_metrics(table, outcomes, n_resamples=200, seed=3)
    assert [row["metric"] for row in rows] == ["car", "reward", "loss_student"]
    for row, values in zip(rows, table.values()):
        assert set(row) == {"metric", "spearman", "spearman_low", "spearman_high", "kendall", "n"}
        assert row["spearman"] == pytest.approx(naive_spearman(list(values), list(outcomes)))
        assert row["kendall"] == pytest.approx(naive_kendall_tau_b(list(values), list(outcomes)))
        assert row["spearman_low"] <= row["spearman"] <= row["spearman_high"]
        assert row["n"] == rewards.size


def test_correlate_metrics_drops_unmeasured_teachers():
    rows = correlate_metrics({"length": [3.0, float("nan"), 1.0, 2.0]}, [3.0, 0.0, 1.0, 2.0], n_resamples=50)
    assert rows[0]["n"] == 3
    assert rows[0]["spearman"] == pytest.approx(1.0)


# ---------------------------------------------------------------- constants


def test_paper_table4_mean_row_matches_the_five_bases():
    bases = [base for base in PAPER_TABLE4 if base != "mean"]
    assert len(bases) == 5
    metric_names = {
        "ArmoRM", "Sky-8B", "Sky-27B", "IFD-GPT2", "IFD-self", "PPL-GPT2", "PPL-self", "length", "CAR",
    }
    for base in PAPER_TABLE4:
        assert set(PAPER_TABLE4[base]) == metric_names
    for metric in metric_names:
        mean = sum(PAPER_TABLE4[base][metric] for base in bases) / 5
        assert abs(mean - PAPER_TABLE4["mean"][metric]) <= 0.002, metric


def test_metric_direction_covers_the_ranked_metrics():
    assert set(METRIC_DIRECTION) == {
        "car", "reward", "length", "ppl_student", "ppl_ref", "ifd_student", "ifd_ref", "loss_student",
        "grape", "grace", "reward_2", "car_2",
    }
    assert all(d in (-1, 1) for d in METRIC_DIRECTION.values())
    assert METRIC_DIRECTION["car"] == 1 and METRIC_DIRECTION["loss_student"] == -1
    assert METRIC_DIRECTION["grape"] == 1 and METRIC_DIRECTION["grace"] == -1  # GRACE: lower is better


def test_default_grid_is_zero_plus_log_grid():
    grid = metrics.DEFAULT_BETA_GRID
    assert grid[0] == 0.0 and grid.size == 42
    np.testing.assert_allclose(grid[1:], np.geomspace(0.01, 100, 41))


def _naive_pick(rewards, losses, beta, transform, n_resamples, seed):
    """The paired bootstrap written out loop by loop: the same instruction draws for every teacher."""
    rewards, losses = np.asarray(rewards, float), np.asarray(losses, float)
    t, n = rewards.shape
    point = []
    for k in range(t):
        ok = [j for j in range(n) if math.isfinite(rewards[k, j]) and math.isfinite(losses[k, j])]
        point.append(transform(sum(rewards[k, j] for j in ok) / len(ok)) / (1 + beta * sum(losses[k, j] for j in ok) / len(ok)))
    order = sorted(range(t), key=lambda k: -point[k])
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    wins = [0] * t
    beats = 0
    for row in draws:
        cars = []
        for k in range(t):
            ok = [j for j in row if math.isfinite(rewards[k, j]) and math.isfinite(losses[k, j])]
            cars.append(transform(sum(rewards[k, j] for j in ok) / len(ok)) / (1 + beta * sum(losses[k, j] for j in ok) / len(ok))
                        if ok else -math.inf)
        wins[max(range(t), key=lambda k: cars[k])] += 1
        beats += cars[order[0]] > cars[order[1]]
    return point, order[0], order[1], [w / n_resamples for w in wins], beats / n_resamples


@pytest.mark.parametrize("seed", [0, 1])
def test_car_pick_probabilities_match_a_naive_paired_bootstrap(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(3, 9, size=(4, 15))
    losses = rng.uniform(0.5, 3, size=(4, 15))
    rewards[2, 3] = np.nan  # an unparsed judgment: left out of that teacher's means only
    got = metrics.car_pick_probabilities(rewards, losses, 0.7, n_resamples=300, seed=seed)
    point, leader, runner, p_best, p_beats = _naive_pick(rewards, losses, 0.7, lambda x: x, 300, seed)
    assert got["car"] == pytest.approx(point, rel=1e-12)
    assert (got["leader"], got["runner_up"]) == (leader, runner)
    assert got["p_best"] == pytest.approx(p_best, abs=1e-12) and sum(got["p_best"]) == pytest.approx(1.0)
    assert got["p_leader_beats_runner_up"] == pytest.approx(p_beats, abs=1e-12)


def test_car_pick_probabilities_separate_clear_and_tied_teachers():
    rng = np.random.default_rng(3)
    losses = rng.uniform(1, 2, size=(2, 40))
    clear = np.stack([np.full(40, 9.0), np.full(40, 3.0)]) + rng.normal(0, 0.3, size=(2, 40))
    got = metrics.car_pick_probabilities(clear, losses, 1.0, n_resamples=500)
    assert got["leader"] == 0 and got["p_leader_beats_runner_up"] == 1.0 and got["p_best"][0] == 1.0
    same = np.stack([clear[0], clear[0]])  # two identical response sets: a coin toss at best, never a pick
    tied = metrics.car_pick_probabilities(same, np.stack([losses[0], losses[0]]), 1.0, n_resamples=500)
    assert tied["p_leader_beats_runner_up"] == 0.0  # equal CAR in every resample: "beats" is strict
    with pytest.raises(ValueError, match="at least 2 teachers"):
        metrics.car_pick_probabilities(clear[:1], losses[:1])
