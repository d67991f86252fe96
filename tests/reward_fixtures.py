"""Reward functions for tests/test_rewards.py, most of them deliberately misbehaving.

Named by import path ("reward_fixtures:raises"): pytest puts tests/ on sys.path, and a spawned
worker process inherits the parent's sys.path, so both can import this module.
"""
import os
import time

NOT_A_FUNCTION = 1.0


def task_is_count(completions, solution, task, **columns):
    """1.0 where the row's task column is "count"; fails if the runner passed the image column."""
    if "image" in columns:
        raise AssertionError("the runner passed an image to a reward")
    return [float(t == "count") for t in task]


def raises(completions, **columns):
    raise ValueError("boom")


def wrong_length(completions, **columns):
    return [1.0] * (len(completions) + 1)


def returns_string(completions, **columns):
    return "1.0"


def non_numeric(completions, **columns):
    return ["yes"] * len(completions)


def first_is_nan(completions, **columns):
    """NaN for the first completion, 1.0 (as an int, a bool and None mixed in) for the rest."""
    return [float("nan")] + [1, True, None, 1.0][: len(completions) - 1]


def misbehaves_on_request(completions, **columns):
    """1.0 per completion, unless a completion asks it to "hang" or "exit" its process."""
    if "hang" in completions:
        time.sleep(1000)
    if "exit" in completions:
        os._exit(3)
    return [1.0] * len(completions)


def huge(completions, **columns):
    """A finite value beyond float32's range for the first completion, 1.0 for the others."""
    return [1e39] + [1.0] * (len(completions) - 1)


def takes_no_columns(completions, solution):
    """A wrong signature: the runner passes every dataset column as a keyword."""
    return [1.0] * len(completions)


def length_mod_3(completions, **columns):
    """A reward that varies between a prompt's completions even for an untrained model, so
    group advantages and gradients are not zero (distributed equivalence tests)."""
    return [float(len(c) % 3) for c in completions]
