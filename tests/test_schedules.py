import math

import pytest

from mr1fast import GRPO_D_PRESETS, beta_schedule, cosine_beta, grpo_d_beta, linear_beta


def test_grpo_d_is_v_shaped_as_in_the_paper():
    lo, hi = GRPO_D_PRESETS["counting"]
    assert (lo, hi) == (0.04, 0.1) and GRPO_D_PRESETS["geometry"] == (0.0, 0.02)
    t = 100
    assert math.isclose(grpo_d_beta(0, t, lo, hi), 0.07)
    assert math.isclose(grpo_d_beta(30, t, lo, hi), 0.04)      # w = 0.3 t
    assert math.isclose(grpo_d_beta(15, t, lo, hi), 0.055)     # halfway down
    assert math.isclose(grpo_d_beta(65, t, lo, hi), 0.07)      # halfway up
    assert math.isclose(grpo_d_beta(100, t, lo, hi), 0.1)
    assert math.isclose(grpo_d_beta(500, t, lo, hi), 0.1)      # past the end: beta_max
    seq = [grpo_d_beta(s, t, lo, hi) for s in range(t + 1)]
    assert all(a >= b for a, b in zip(seq[:30], seq[1:31]))
    assert all(a <= b for a, b in zip(seq[30:], seq[31:]))


def test_geometry_preset_schedule():
    f = beta_schedule("grpo_d", 10, preset="geometry")
    assert math.isclose(f(0), 0.01) and math.isclose(f(3), 0.0) and math.isclose(f(10), 0.02)
    assert beta_schedule("constant", 10, preset="counting")(7) == 0.04


def test_other_schedules():
    assert math.isclose(linear_beta(5, 10, 0.0, 0.1), 0.05)
    assert math.isclose(cosine_beta(0, 10, 0.1, 0.0), 0.1)
    assert math.isclose(cosine_beta(10, 10, 0.1, 0.0), 0.0)
    assert math.isclose(cosine_beta(5, 10, 0.1, 0.0), 0.05)


@pytest.mark.parametrize("call,match", [
    (lambda: grpo_d_beta(0, 0, 0.0, 0.1), "total_steps"),
    (lambda: grpo_d_beta(-1, 10, 0.0, 0.1), "step"),
    (lambda: grpo_d_beta(0, 10, -0.1, 0.1), "beta_min"),
    (lambda: grpo_d_beta(0, 10, 0.0, 0.1, explore_ratio=1.5), "explore_ratio"),
    (lambda: beta_schedule("exp", 10), "kind"),
    (lambda: beta_schedule("grpo_d", 10, preset="chess"), "preset"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
