import math

import pytest

from peft_decaylora import DecayLoraConfig
from peft_decaylora.schedule import AdapterSchedule, decay_factor, noise_active, noise_scale, schedule_bounds


def d(step, total=1000, start=0.1, end=0.9, min_decay=0.0):
    return decay_factor(step, total_steps=total, decay_start=start, decay_end=end, min_decay=min_decay)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1.0),
        (99, 1.0),
        (100, 1.0),  # first step of the linear decay
        (101, 1 - 1 / 800),
        (500, 0.5),
        (899, 1 - 799 / 800),
        (900, 0.0),  # first step of the cool-down
        (901, 0.0),
        (5000, 0.0),
    ],
)
def test_default_schedule_around_every_boundary(step, expected):
    assert d(step) == pytest.approx(expected, abs=1e-12)


def test_min_decay_sets_the_floor_and_the_slope():
    assert d(500, min_decay=0.2) == pytest.approx(1 - 0.5 * 0.8)
    assert d(900, min_decay=0.2) == 0.2
    assert d(10_000, min_decay=0.2) == 0.2


def test_integer_points_are_steps_and_need_no_total():
    kwargs = dict(total_steps=None, decay_start=10, decay_end=30, min_decay=0.0)
    assert decay_factor(9, **kwargs) == 1.0
    assert decay_factor(20, **kwargs) == pytest.approx(0.5)
    assert decay_factor(30, **kwargs) == 0.0


def test_equal_start_and_end_is_a_step_at_start():
    kwargs = dict(total_steps=None, decay_start=50, decay_end=50, min_decay=0.1)
    assert decay_factor(49, **kwargs) == 1.0
    assert decay_factor(50, **kwargs) == 0.1


def test_fractions_are_rounded_to_steps():
    assert schedule_bounds(1000, 0.1, 0.9) == (100, 900)
    assert schedule_bounds(7, 0.5, 1.0) == (4, 7)


def test_unknown_length_is_warm_up_at_step_zero_and_an_error_after():
    assert decay_factor(0, total_steps=None, decay_start=0.1, decay_end=0.9, min_decay=0.0) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        decay_factor(5, total_steps=None, decay_start=0.1, decay_end=0.9, min_decay=0.0)


def test_start_after_end_once_resolved_is_an_error():
    with pytest.raises(ValueError, match="decay_start"):
        decay_factor(5, total_steps=100, decay_start=0.5, decay_end=20, min_decay=0.0)


@pytest.mark.parametrize(
    "mode, d_value, expected",
    [
        ("vanish", 1.0, False),
        ("vanish", 0.5, True),
        ("vanish", 0.3, True),
        ("vanish", 0.29, False),
        ("vanish", 0.0, False),
        ("keep", 1.0, False),
        ("keep", 0.29, True),
        ("keep", 0.0, True),
        ("off", 0.5, False),
    ],
)
def test_noise_schedules(mode, d_value, expected):
    assert noise_active(d_value, mode, 0.3) is expected
    assert noise_scale(d_value, mode, 0.3) == (pytest.approx(math.sqrt(1 - d_value**2)) if expected else 0.0)


def test_a_step_is_told_from_a_fraction():
    """decay_end=1 is step 1; decay_end=1.0 is the whole run."""
    kwargs = dict(total_steps=100, decay_start=0, min_decay=0.0)
    assert decay_factor(20, decay_end=1, **kwargs) == 0.0
    assert decay_factor(20, decay_end=1.0, **kwargs) == pytest.approx(0.8)


def test_an_adapter_schedule_computes_d_and_the_noise_scale_once_per_move():
    config = DecayLoraConfig(target_modules=["q"], total_steps=100, decay_start=0, decay_end=40, noise="vanish")
    schedule = AdapterSchedule(config)
    assert schedule.state() == {"step": 0, "decay_factor": 1.0, "noise_active": False, "noise_scale": 0.0}
    schedule.move_to(20)
    assert (schedule.step, schedule.decay, schedule.noise_scale) == (20, 0.5, pytest.approx(0.75**0.5))
    config.decay_end = 20  # the values are those of the last move, not of every read
    assert schedule.decay == 0.5
    schedule.move_to(20)
    assert schedule.decay == 0.0


def test_cosine_decay_is_slow_at_both_ends():
    kwargs = dict(total_steps=100, decay_start=10, decay_end=50, min_decay=0.2, decay_shape="cosine")
    assert decay_factor(10, **kwargs) == 1.0 and decay_factor(50, **kwargs) == 0.2
    assert decay_factor(30, **kwargs) == pytest.approx(0.6)  # the midpoint is the linear one's
    quarter = 1 - 0.8 * (1 - math.cos(math.pi / 4)) / 2
    assert decay_factor(20, **kwargs) == pytest.approx(quarter)  # above linear's 0.8 early on
    assert decay_factor(40, **kwargs) == pytest.approx(1.2 - quarter)  # below linear's 0.4 late, by symmetry
    assert [decay_factor(s, **kwargs) for s in range(10, 51)] == sorted(
        (decay_factor(s, **kwargs) for s in range(10, 51)), reverse=True)
