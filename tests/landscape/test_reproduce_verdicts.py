"""The reproduction's verdict rules on synthetic numbers (nothing is trained here).

Each experiment's rule (``decide`` next to its ``RULE`` text in ``landscape/reproduce/<name>.py``)
is driven to each of its outcomes -- reproduced, not reproduced, inconclusive -- by numbers
written by hand, and the combination rule ``combine_verdicts`` through every case. ``compare`` counts a
difference of means only when it exceeds the standard error of the difference, so "clearly
better" below is a gap of 10 points with a spread of 1, and "within noise" a gap smaller than
the spread.
"""

from __future__ import annotations

import math

import pytest

from landscape.reproduce import angle, cosine, curvature, directions, eigenvalues, rho_sweep, table
from landscape.reproduce.stats import _se_diff, combine_verdicts, compare, mean_std

R, N, INC, PART = "reproduced", "not reproduced", "inconclusive", "partly reproduced"

HIGH = [0.90, 0.91, 0.92]   # mean 0.91, std 0.01
LOW = [0.80, 0.81, 0.82]    # mean 0.81: HIGH - LOW = 0.10 >> standard error 0.008
NOISY = [0.80, 0.92]        # mean 0.86, std 0.085: within noise of both


# ------------------------------------------------------------------------------------------------
# the statistics the rules use, against hand-computed values
# ------------------------------------------------------------------------------------------------
def test_stats_and_compare_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([1.0, float("nan"), 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))  # nan skipped
    assert all(math.isnan(v) for v in mean_std([]))
    # SE of the difference of means: hypot(s_a / sqrt(n_a), s_b / sqrt(n_b))
    assert _se_diff([1.0, 3.0], [2.0, 2.0, 2.0]) == pytest.approx(math.sqrt(2.0) / math.sqrt(2.0))
    assert compare(HIGH, LOW) == 1 and compare(LOW, HIGH) == -1
    assert compare(NOISY, HIGH) == 0 and compare(HIGH, NOISY) == 0
    # the margin is the standard error: a gap of 1.5 SE counts, 0.5 SE does not
    a, b = [0.0, 2.0], [0.0, 2.0]
    se = _se_diff(a, b)
    assert compare([x + 1.5 * se for x in a], b) == 1
    assert compare([x + 0.5 * se for x in a], b) == 0
    assert compare([1.0], [1.0]) == 0  # equal single values: no difference
    assert compare([float("nan")], [1.0]) == 0


# ------------------------------------------------------------------------------------------------
# the combination rule, every case
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts, expected", [
    ([], INC),
    ([R], R), ([R, R, R], R),
    ([N], N), ([N, N], N),
    ([INC], INC), ([INC, INC], INC),
    ([R, N], PART), ([R, INC], PART), ([R, N, INC], PART),
    ([N, INC], INC), ([INC, N, N], INC),
])
def test_combine(parts, expected):
    assert combine_verdicts(parts) == expected


# ------------------------------------------------------------------------------------------------
# table: accuracy, speed, ladder
# ------------------------------------------------------------------------------------------------
def _rows(msam=HIGH, sgd=LOW, nag=LOW, sam=HIGH, lr_scaled=LOW, speed_msam=0.97, speed_sam=0.5):
    return {
        "SGD": {"test_acc": sgd, "speed_vs_sgd": 1.0},
        "NAG": {"test_acc": nag, "speed_vs_sgd": 0.99},
        "SAM": {"test_acc": sam, "speed_vs_sgd": speed_sam},
        "MSAM": {"test_acc": msam, "speed_vs_sgd": speed_msam},
        "MSAM-lr-scaled": {"test_acc": lr_scaled, "speed_vs_sgd": 0.98},
    }


def test_table_all_parts_reproduced():
    assert table.decide(_rows()) == (R, {"accuracy": R, "speed": R, "ladder": R})


@pytest.mark.parametrize("kw, accuracy", [
    ({}, R),                                   # above SGD and NAG
    ({"msam": LOW, "sgd": HIGH}, N),           # below SGD
    ({"msam": NOISY}, INC),                    # within noise of SGD
    ({"nag": HIGH}, INC),                      # above SGD, not above NAG
])
def test_table_accuracy(kw, accuracy):
    assert table.decide(_rows(**kw))[1]["accuracy"] == accuracy


@pytest.mark.parametrize("speed_msam, speed_sam, speed", [
    (0.97, 0.50, R),
    (0.85, 1 / 1.5, R),        # both boundaries are inclusive
    (0.84, 0.50, N),           # MSAM more than 15 % slower than SGD
    (0.97, 0.70, N),           # SAM not 1.5x slower
])
def test_table_speed(speed_msam, speed_sam, speed):
    """Speed is a yes/no rule (no inconclusive outcome): a ratio of mean times."""
    assert table.decide(_rows(speed_msam=speed_msam, speed_sam=speed_sam))[1]["speed"] == speed


@pytest.mark.parametrize("lr_scaled, ladder", [(LOW, R), ([0.99, 1.0], N), (NOISY, INC)])
def test_table_ladder(lr_scaled, ladder):
    assert table.decide(_rows(msam=HIGH, lr_scaled=lr_scaled))[1]["ladder"] == ladder


def test_table_overall_combines_the_parts():
    assert table.decide(_rows(msam=LOW, sgd=HIGH, lr_scaled=[0.7, 0.71]))[0] == PART
    overall, parts = table.decide(_rows(msam=LOW, sgd=HIGH, speed_msam=0.5, lr_scaled=HIGH))
    assert parts == {"accuracy": N, "speed": N, "ladder": N} and overall == N
    # a part is decided only when its optimizers were run
    only = {k: v for k, v in _rows().items() if k in ("SGD", "MSAM")}
    assert table.decide(only) == (INC, {})


# ------------------------------------------------------------------------------------------------
# rho sweep
# ------------------------------------------------------------------------------------------------
def _points(neg, zero, pos):
    return [{"rho": -1.0, "test_acc": neg}, {"rho": 0.0, "test_acc": zero},
            {"rho": 0.5, "test_acc": [0.5, 0.51]}, {"rho": 1.0, "test_acc": pos}]


@pytest.mark.parametrize("neg, zero, pos, expected", [
    ([0.70, 0.71, 0.72], LOW, HIGH, R),     # positive helps, negative hurts
    (HIGH, LOW, [0.95, 0.96, 0.97], N),     # negative side as good as rho = 0
    ([0.70, 0.71, 0.72], LOW, LOW, N),      # the positive side does not help
    ([0.74, 0.86], LOW, HIGH, INC),         # negative below rho = 0, but within noise
])
def test_rho_sweep(neg, zero, pos, expected):
    assert rho_sweep.decide(_points(neg, zero, pos)) == expected


def test_rho_sweep_uses_the_best_positive_and_most_negative_rho():
    pts = _points([0.70, 0.71, 0.72], LOW, HIGH) + [{"rho": -0.5, "test_acc": HIGH}]
    assert rho_sweep.decide(pts) == R  # rho -0.5 is not the most negative
    no_negative = [p for p in _points(LOW, LOW, HIGH) if p["rho"] >= 0]
    assert rho_sweep.decide(no_negative) == INC
    no_positive = [p for p in _points([0.7, 0.71], LOW, HIGH) if p["rho"] <= 0]
    assert rho_sweep.decide(no_positive) == N


# ------------------------------------------------------------------------------------------------
# cosine
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frac, first, last, expected", [
    ([0.7, 0.8], [-0.30, -0.20], [-0.01, 0.00], R),
    ([0.4, 0.45], [-0.30, -0.20], [-0.01, 0.00], N),   # mostly positive
    ([0.7, 0.8], [-0.01, 0.00], [-0.30, -0.20], N),    # does not go to 0
    ([0.7, float("nan")], [-0.3, -0.2], [0.0, 0.0], INC),
    ([0.7], [float("nan")], [0.0], INC),
])
def test_cosine(frac, first, last, expected):
    assert cosine.decide(frac, first, last) == expected


# ------------------------------------------------------------------------------------------------
# angle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho_0, best_rho, expected", [
    (2.0, 3.0, R),
    (1.0, 3.0, R), (9.0, 3.0, R),         # a factor 3 either way is inclusive
    (0.9, 3.0, N), (9.5, 3.0, N),
    (None, 3.0, N),                       # never crosses
    (None, None, N),
    (2.0, None, INC),                     # no sweep to compare with
    (2.0, -1.0, INC), (2.0, 0.0, INC),
])
def test_angle(rho_0, best_rho, expected):
    assert angle.decide(rho_0, best_rho) == expected


def test_angle_zero_crossing_by_hand():
    xs = [0.0, 1.0, 2.0, 4.0]
    assert angle.zero_crossing(xs, [3.0, 1.0, -1.0, -5.0]) == pytest.approx(1.5)
    assert angle.zero_crossing(xs, [2.0, 1.0, 0.5, 0.25]) is None
    assert angle.zero_crossing(xs, [-1.0, 1.0, 2.0, 3.0]) is None  # upward crossing is not rho_0
    assert angle.zero_crossing(xs, [1.0, 0.0, -1.0, -2.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        angle.zero_crossing([0.0, 1.0], [1.0])


# ------------------------------------------------------------------------------------------------
# directions, eigenvalues, curvature
# ------------------------------------------------------------------------------------------------
def _sharp(sam_mom, msam_mom, sam_rand=LOW, msam_rand=LOW, sgd=HIGH):
    return {"SGD": {"-momentum": sgd, "random": sgd},
            "SAM": {"-momentum": sam_mom, "random": sam_rand},
            "MSAM": {"-momentum": msam_mom, "random": msam_rand}}


@pytest.mark.parametrize("sharp, expected", [
    (_sharp(LOW, LOW), R),                          # all four flatter than SGD
    (_sharp(LOW, [0.99, 1.0]), N),                  # MSAM sharper along -momentum
    (_sharp(LOW, LOW, sam_rand=[0.99, 1.0]), N),    # SAM sharper along random
    (_sharp(LOW, NOISY), INC),                      # one within noise, none sharper
])
def test_directions(sharp, expected):
    assert directions.decide(sharp) == expected


@pytest.mark.parametrize("lam, expected", [
    ({"SGD": [10.0, 11.0], "SAM": [5.0, 5.5], "MSAM": [3.0, 3.2]}, R),
    ({"SGD": [10.0, 11.0], "SAM": [5.0, 5.5], "MSAM": [20.0, 21.0]}, N),
    ({"SGD": [10.0, 11.0], "SAM": [5.0, 5.5], "MSAM": [6.0, 16.0]}, INC),
    ({"SGD": [10.0], "SAM": [10.0], "MSAM": [10.0]}, INC),
])
def test_eigenvalues(lam, expected):
    assert eigenvalues.decide(lam) == expected


def _curv(sgd_mom, sgd_rand, msam_mom):
    return {"SGD": {"momentum": sgd_mom, "gradient": 1.0, "random": sgd_rand},
            "SAM": {"momentum": 2.0, "gradient": 1.0, "random": 0.1},
            "MSAM": {"momentum": msam_mom, "gradient": 1.0, "random": 0.1}}


@pytest.mark.parametrize("mean, expected", [
    (_curv(5.0, 0.1, 1.0), R),
    (_curv(0.05, 0.1, 0.01), N),            # momentum not above random for SGD
    (_curv(5.0, 0.1, 6.0), N),              # MSAM not below SGD along the momentum
    (_curv(5.0, 0.1, float("nan")), INC),
])
def test_curvature(mean, expected):
    assert curvature.decide(mean) == expected


def test_every_rule_text_is_the_one_quoted():
    from landscape.reproduce import _RULES

    mods = {"table": table, "rho-sweep": rho_sweep, "cosine": cosine, "angle": angle,
            "directions": directions, "eigenvalues": eigenvalues, "curvature": curvature}
    assert _RULES == {name: m.RULE for name, m in mods.items()}
    assert len(set(_RULES.values())) == len(_RULES)  # seven distinct rules
