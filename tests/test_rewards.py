"""Built-in rewards (R1-V conventions) and RewardRunner's weighting and containment.

Isolated runners start a spawn worker (~3 s each, mostly importing torch), so they are shared per
module; every test that kills a worker checks that the next call starts a fresh one.
"""
import math
import multiprocessing
import threading
import time

import pytest

from mr1fast.trainer.rewards import (BUILTIN_REWARDS, RewardRunner, accuracy_reward,
                                     count_accuracy, format_reward, math_accuracy,
                                     resolve_reward)

import reward_fixtures


@pytest.mark.parametrize("completion, expected", [
    ("<think>two cubes, one ball</think><answer>3</answer>", 1.0),
    ("<think>line one\nline two\n</think>\n\n<answer>\n3\n</answer>\n", 1.0),  # multiline, padded
    ("<answer>3</answer>", 0.0),  # no think
    ("<think>count</think>", 0.0),  # no answer
    ("<think>count</think><answer>3</answer> I hope that helps.", 0.0),  # text after the answer
    ("Sure! <think>count</think><answer>3</answer>", 0.0),  # text before the think
])
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([completion], solution=["3"], task=["count"]) == [expected]


@pytest.mark.parametrize("completion, solution, expected", [
    ("<think>.</think><answer> 3 </answer>", "3", 1.0),
    ("<answer>3</answer>", "<answer> 3 </answer>", 1.0),
    ("<answer>03</answer>", "3", 1.0),  # integer, not string, comparison
    ("<answer>2</answer> no wait <answer>3</answer>", "3", 1.0),  # the last answer counts
    ("<answer>4</answer>", "3", 0.0),
    ("<answer>three</answer>", "3", 0.0),
    ("<answer>3.0</answer>", "3", 0.0),  # the counting regex wants digits only
    ("3", "3", 0.0),  # no answer tag
])
def test_count_accuracy(completion, solution, expected):
    assert count_accuracy([completion], solution=[solution]) == [expected]


@pytest.mark.parametrize("answer, solution, expected", [
    ("70", "70°", 1.0),
    ("70°", "<answer>70°</answer>", 1.0),
    ("70^{\\circ}", "70°", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("2\\sqrt{3}", "2√{3}", 1.0),  # GeoQA writes √{3}
    ("\\sqrt{12}", "2\\sqrt{3}", 1.0),
    ("2", "2\\sqrt{3}", 0.0),  # unwrapped, math-verify would read the gold as 2
    ("3", "3π", 0.0),
    ("71", "70°", 0.0),
    ("\\frac{1}{3}", "\\frac{1}{2}", 0.0),
    ("?!", "?!", 1.0),  # not math: compared as text
    ("#", "?!", 0.0),
])
def test_math_accuracy(answer, solution, expected):
    completion = f"<think>angles</think><answer>{answer}</answer>"
    assert math_accuracy([completion], solution=[solution]) == [expected]


def test_math_accuracy_needs_an_answer_tag():
    assert math_accuracy(["70°"], solution=["70°"]) == [0.0]


def test_accuracy_dispatches_on_integer_solutions():
    completions = ["<answer>3.0</answer>", "<answer>70</answer>", "<answer>3</answer>"]
    # 3.0 would pass math_accuracy, but an integer solution is a count; 70° is not an integer.
    solutions = ["3", "70°", "<answer> 3 </answer>"]
    assert accuracy_reward(completions, solution=solutions) == [0.0, 1.0, 1.0]


def test_resolve_reward():
    assert resolve_reward("format") is format_reward
    assert set(BUILTIN_REWARDS) == {"format", "accuracy", "count_accuracy", "math_accuracy"}
    assert resolve_reward("reward_fixtures:raises") is reward_fixtures.raises
    assert resolve_reward("reward_fixtures.raises") is reward_fixtures.raises
    for spec, message in [("nope", "unknown reward 'nope'"),
                          ("no_such_module:f", "cannot import module 'no_such_module'"),
                          ("reward_fixtures:missing", "has no function 'missing'"),
                          ("reward_fixtures:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'")]:
        with pytest.raises(ValueError, match=message):
            resolve_reward(spec)


def test_runner_rejects_bad_configuration():
    with pytest.raises(ValueError, match="'nope'"):
        RewardRunner({"format": 1.0, "nope": 1.0})
    for weight in (math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="weight must be a finite number"):
            RewardRunner({"format": weight})
    with pytest.raises(ValueError, match="at least one reward"):
        RewardRunner({})
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        RewardRunner({"format": 1.0}, isolate=False)(["a", "b"], [{"solution": "3"}])


def test_weighted_total():
    runner = RewardRunner({"accuracy": 1.0, "format": 0.5}, isolate=False)
    completions = ["<think>.</think><answer>3</answer>", "<answer>3</answer>",
                   "<think>.</think><answer>4</answer>", "3"]
    result = runner(completions, [{"solution": "3"}] * 4)
    assert result.values == {"accuracy": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert result.total == [1.5, 1.0, 0.5, 0.0]
    assert result.failures == {"accuracy": 0, "format": 0}
    empty = runner([], [])
    assert (empty.total, empty.values) == ([], {"accuracy": [], "format": []})
    assert runner.failures == {"accuracy": 0, "format": 0}


MISBEHAVING = ["raises", "wrong_length", "returns_string", "non_numeric", "first_is_nan"]


@pytest.fixture(scope="module", params=[True, False], ids=["isolated", "inline"])
def contained(request):
    """One batch through a runner with every misbehaving reward: (runner, result, log lines)."""
    messages = []
    weights = {"accuracy": 1.0, "reward_fixtures:task_is_count": 2.0,
               **{f"reward_fixtures:{name}": 1.0 for name in MISBEHAVING}}
    with RewardRunner(weights, isolate=request.param, log=messages.append) as runner:
        # The image column is unpicklable (a lambda): the runner must never send it.
        rows = [{"solution": "3", "task": "count", "image": lambda: None},
                {"solution": "70°", "task": "geometry", "image": lambda: None},
                {"solution": "5", "task": "count", "image": lambda: None}]
        completions = ["<answer>3</answer>", "<answer>70</answer>", "<answer>4</answer>"]
        yield runner, runner(completions, rows), messages


def test_well_behaved_rewards_see_columns_not_images(contained):
    _, result, _ = contained
    assert result.values["accuracy"] == [1.0, 1.0, 0.0]
    assert result.values["reward_fixtures:task_is_count"] == [1.0, 0.0, 1.0]
    assert result.failures["accuracy"] == result.failures["reward_fixtures:task_is_count"] == 0


@pytest.mark.parametrize("name, reason", [
    ("raises", "raised ValueError: boom"),
    ("wrong_length", "returned 4 values for 3 completions"),
    ("returns_string", "returned str, expected a list of 3 numbers"),
    ("non_numeric", "returned a str ('yes'), expected numbers or None"),
])
def test_misbehaving_reward_counts_as_missing(contained, name, reason):
    runner, result, messages = contained
    spec = f"reward_fixtures:{name}"
    assert result.values[spec] == [None, None, None]
    assert result.failures[spec] == 1 and runner.failures[spec] == 1
    assert [m for m in messages if spec in m] == [
        f"reward {spec!r} {reason}; its values count as missing for this batch"]


def test_non_finite_values_alone_count_as_missing(contained):
    runner, result, messages = contained
    spec = "reward_fixtures:first_is_nan"
    assert result.values[spec] == [None, 1.0, 1.0]
    assert result.failures[spec] == 1
    assert any(spec in m and "non-finite values" in m and "at positions [0]" in m
               for m in messages)
    # accuracy + 2 * task_is_count + first_is_nan, with the failed rewards adding nothing.
    assert result.total == [1.0 + 2.0, 1.0 + 1.0, 2.0 + 1.0]


def test_failures_accumulate(contained):
    runner, _, _ = contained
    before = dict(runner.failures)
    result = runner(["<answer>3</answer>"], [{"solution": "3", "task": "count"}])
    assert result.total == [1.0 + 2.0]
    assert runner.failures == {name: n + result.failures[name] for name, n in before.items()}
    assert runner.failures["reward_fixtures:raises"] == 2


def test_default_log_warns():
    runner = RewardRunner({"reward_fixtures:raises": 1.0}, isolate=False)
    with pytest.warns(RuntimeWarning, match="'reward_fixtures:raises' raised ValueError: boom"):
        assert runner(["x"], [{"solution": "3"}]).total == [0.0]


TIMEOUT_S = 1.0
OK = "<think>.</think><answer>3</answer>"


@pytest.fixture(scope="module")
def guarded():
    """An isolated runner whose second reward hangs or exits its process when asked to."""
    messages = []
    weights = {"format": 1.0, "reward_fixtures:misbehaves_on_request": 1.0}
    with RewardRunner(weights, timeout_s=TIMEOUT_S, log=messages.append) as runner:
        yield runner, messages
    assert not [p for p in multiprocessing.active_children() if p.name == "mr1fast-rewards"]


def score(runner, completions):
    return runner(completions, [{"solution": "3"}] * len(completions))


def assert_works(runner):
    result = score(runner, [OK, "no"])
    assert result.total == [2.0, 1.0]
    assert result.failures == {"format": 0, "reward_fixtures:misbehaves_on_request": 0}


def test_hanging_reward_times_out(guarded):
    runner, messages = guarded
    assert_works(runner)  # starts the worker, so the timing below is the hang alone
    messages.clear()
    start = time.monotonic()
    result = score(runner, [OK, "hang"])
    assert time.monotonic() - start < TIMEOUT_S + 2.0
    assert result.values == {"format": [1.0, 0.0],
                             "reward_fixtures:misbehaves_on_request": [None, None]}
    assert result.total == [1.0, 0.0]
    assert result.failures["reward_fixtures:misbehaves_on_request"] == 1
    assert messages == ["reward 'reward_fixtures:misbehaves_on_request' timed out after 1s; "
                        "its values count as missing for this batch"]
    assert_works(runner)  # a fresh worker


def test_reward_that_kills_its_worker(guarded):
    runner, messages = guarded
    messages.clear()
    result = score(runner, [OK, "exit"])
    assert result.values["reward_fixtures:misbehaves_on_request"] == [None, None]
    assert messages == ["reward 'reward_fixtures:misbehaves_on_request' killed its worker process "
                        "(exit code 3); its values count as missing for this batch"]
    assert_works(runner)


def test_timeout_off_the_main_thread(guarded):
    runner, messages = guarded
    messages.clear()
    results = []

    def score_twice():
        results.append(score(runner, [OK, "hang"]))
        results.append(score(runner, [OK, "no"]))

    thread = threading.Thread(target=score_twice)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    hung, recovered = results
    assert hung.values["reward_fixtures:misbehaves_on_request"] == [None, None]
    assert recovered.total == [2.0, 1.0]
    assert len(messages) == 1 and "timed out after 1s" in messages[0]


def test_numpy_scalars_are_numbers():
    import numpy as np

    from mr1fast.trainer.rewards import _checked

    values, problem = _checked([np.float32(0.5), np.int64(1), None, True], 4)
    assert values == [0.5, 1.0, None, 1.0] and problem is None
    assert _checked(["0.5"], 1)[0] is None


def test_a_column_only_some_rows_have_is_none_elsewhere():
    seen = {}

    def spy(completions, solution, **columns):
        seen.update(columns)
        return [1.0] * len(completions)

    import mr1fast.trainer.rewards as rewards_module
    rewards_module.BUILTIN_REWARDS["_spy"] = spy
    try:
        runner = rewards_module.RewardRunner({"_spy": 1.0}, isolate=False)
        out = runner(["a", "b"], [{"solution": "1", "thinking": "t"}, {"solution": "2"}])
    finally:
        del rewards_module.BUILTIN_REWARDS["_spy"]
    assert out.total == [1.0, 1.0] and seen["thinking"] == ["t", None]
