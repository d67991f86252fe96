"""Rewards for GRPO-D (R1-V conventions) and a runner that keeps misbehaving rewards contained.

A reward follows the TRL convention ``f(completions, solution, **columns) -> list[float | None]``:
one call per batch, every dataset column passed as a list aligned with ``completions``, and None
meaning "no value for this completion". Built-ins: ``format`` (the ``<think>..</think><answer>..
</answer>`` layout), ``accuracy`` (``count_accuracy`` for integer solutions, else
``math_accuracy``). Any other reward is named by an import path, ``"package.module:function"``.

``RewardRunner`` weights and sums the rewards, and contains a reward that raises, hangs or returns
garbage: it is logged, its values count as missing for that batch, and training goes on.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing
import numbers
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

from math_verify import parse, verify

Reward = Callable[..., list]

_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_COUNT_ANSWER = re.compile(r"<answer>\s*(\d+)\s*</answer>")
_INTEGER = re.compile(r"\d+")
_NOT_SENT = frozenset({"image"})  # never passed to rewards, so never pickled
_STARTUP_TIMEOUT_S = 120.0
FLOAT32_MAX = 3.4028234663852886e38  # importing torch and the reward modules in a fresh worker


def completion_answer(text: str) -> str | None:
    """Stripped content of the last ``<answer>..</answer>`` in ``text``, or None."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def gold_answer(solution: str) -> str:
    """A solution's answer: given as ``<answer> 3 </answer>`` or bare ``3``."""
    answer = completion_answer(solution)
    return solution.strip() if answer is None else answer


_answer, _gold = completion_answer, gold_answer


def _math_parse(text: str) -> list:
    """math-verify's parse of an answer, read as LaTeX math first.

    Unwrapped, math-verify reads ``2\\sqrt{3}`` as 2 and ``3π`` as 3, so the text is wrapped in
    ``$..$`` (with GeoQA's ``√`` spelled ``\\sqrt``); the plain parse is the fallback. Timeouts
    are off: math-verify's use SIGALRM, which fails off the main thread; RewardRunner bounds time.
    """
    latex = parse("$" + text.replace("√", "\\sqrt") + "$", parsing_timeout=None)
    return latex or parse(text, parsing_timeout=None)


def _count_score(completion: str, solution: str) -> float:
    found = _COUNT_ANSWER.findall(completion)
    gold = _gold(solution)
    return float(bool(found) and _INTEGER.fullmatch(gold) is not None
                 and int(found[-1]) == int(gold))


def _math_score(completion: str, solution: str) -> float:
    answer, gold = _answer(completion), _gold(solution)
    if answer is None:
        return 0.0
    if answer == gold:
        return 1.0
    gold_parsed, answer_parsed = _math_parse(gold), _math_parse(answer)
    return float(bool(gold_parsed and answer_parsed)
                 and verify(gold_parsed, answer_parsed, timeout_seconds=None))


def format_reward(completions: list[str], solution: list[str] | None = None,
                  **columns) -> list[float]:
    """1.0 where the whole completion is ``<think>..</think> <answer>..</answer>``, else 0.0."""
    return [float(_FORMAT.fullmatch(c.strip()) is not None) for c in completions]


def count_accuracy(completions: list[str], solution: list[str], **columns) -> list[float]:
    """Counting: 1.0 where the last ``<answer> N </answer>`` equals the solution's integer."""
    return [_count_score(c, s) for c, s in zip(completions, solution)]


def math_accuracy(completions: list[str], solution: list[str], **columns) -> list[float]:
    """Geometry: 1.0 where the ``<answer>`` content equals the solution's, exactly as text or
    mathematically by math-verify (``70`` matches ``70°``, ``0.5`` matches ``\\frac{1}{2}``)."""
    return [_math_score(c, s) for c, s in zip(completions, solution)]


def accuracy_reward(completions: list[str], solution: list[str], **columns) -> list[float]:
    """Per row: ``count_accuracy`` where the solution is an integer, else ``math_accuracy``."""
    return [_count_score(c, s) if _INTEGER.fullmatch(_gold(s)) else _math_score(c, s)
            for c, s in zip(completions, solution)]


BUILTIN_REWARDS: dict[str, Reward] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "count_accuracy": count_accuracy,
    "math_accuracy": math_accuracy,
}


def resolve_reward(name: str) -> Reward:
    """A built-in reward by name, or a function by import path ``"package.module:function"``
    (``"package.module.function"`` also works). Raises ValueError naming ``name`` if neither."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)} or an "
                         f"import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return func


def _checked(out, n: int) -> tuple[list[float | None] | None, str | None]:
    """(values as plain floats or None, what was wrong or None) for a reward's return value."""
    if not isinstance(out, (list, tuple)):
        return None, f"returned {type(out).__name__}, expected a list of {n} numbers"
    if len(out) != n:
        return None, f"returned {len(out)} values for {n} completions"
    # numbers.Real admits numpy scalars (np.float32, np.int64) as well as int/float/bool.
    wrong = [v for v in out if v is not None and not isinstance(v, numbers.Real)]
    if wrong:
        return None, (f"returned a {type(wrong[0]).__name__} ({wrong[0]!r:.50}), "
                      "expected numbers or None")
    values = [None if v is None else float(v) for v in out]
    # The trainer's rewards are fp32: a finite value beyond its range would become inf there.
    bad = [i for i, v in enumerate(values) if v is not None and not abs(v) <= FLOAT32_MAX]
    for i in bad:
        values[i] = None
    return values, (f"returned non-finite values or values outside float32's range (|v| > "
                    f"{FLOAT32_MAX:.4g}) at positions {bad}") if bad else None


def _run_reward(func: Reward, completions: list[str], columns: dict[str, list]):
    """One reward call on a batch as ``_checked``'s (values, problem); exceptions are problems."""
    try:
        return _checked(func(completions, **columns), len(completions))
    except Exception as e:
        return None, f"raised {type(e).__name__}: {e}"


def _serve(conn, names: list[str]) -> None:
    """Worker process: resolve the rewards, say ready (None) or why not, then answer requests
    ``(name, completions, columns)`` with ``_run_reward``'s result until the pipe closes."""
    try:
        funcs = {name: resolve_reward(name) for name in names}
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send(None)
    while True:
        try:
            name, completions, columns = conn.recv()
        except EOFError:
            return
        conn.send(_run_reward(funcs[name], completions, columns))


@dataclass
class RewardResult:
    """One batch: ``total[i]`` is the weighted sum over rewards (missing values add 0);
    ``values[name][i]`` the unweighted value or None; ``failures[name]`` 1 if that call failed."""
    total: list[float]
    values: dict[str, list[float | None]]
    failures: dict[str, int]

    @classmethod
    def merge(cls, results: list["RewardResult"]) -> "RewardResult":
        """One result of several (each rank's part of a batch), in order."""
        names = list(results[0].values)
        return cls([t for r in results for t in r.total],
                   {n: [v for r in results for v in r.values[n]] for n in names},
                   {n: sum(r.failures[n] for r in results) for n in names})

    def mean(self, names) -> float:
        """The mean of the present values of the rewards `names` (NaN when none is present)."""
        vals = [v for name in names for v in self.values[name] if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")


class RewardRunner:
    """Weighted sum of rewards, e.g. ``RewardRunner({"accuracy": 1.0, "format": 0.5})``.

    ``isolate=True`` runs the rewards in one persistent worker process (spawn context, started on
    first use), waiting at most ``timeout_s`` per reward call; a worker that times out or dies is
    killed and replaced on the next call. Works from any thread. As with any spawn process, the
    main script must guard its entry point with ``if __name__ == "__main__":``. ``isolate=False``
    calls the rewards inline with no time limit: for trusted, fast rewards only.
    ``log`` receives one line per failure (default: ``warnings.warn``); ``self.failures`` counts
    failed calls per reward since construction. Use as a context manager, or call ``close()``.
    """

    def __init__(self, weights: dict[str, float], *, timeout_s: float = 10.0, isolate: bool = True,
                 log: Callable[[str], None] | None = None):
        if not weights:
            raise ValueError("RewardRunner needs at least one reward in weights")
        for name, weight in weights.items():
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not (number and math.isfinite(weight)):
                raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self._funcs = {name: resolve_reward(name) for name in self.weights}
        self.timeout_s = timeout_s
        self.isolate = isolate
        self.log = log or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.failures = dict.fromkeys(self.weights, 0)
        self._process = None
        self._conn = None
        self._lock = threading.Lock()  # one batch at a time through the worker's pipe

    def __call__(self, completions: list[str], rows: list[dict]) -> RewardResult:
        """Score ``completions``; ``rows[i]`` is completion i's dataset row, with a "solution"."""
        if len(rows) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        # The union of the rows' keys: a column that only some rows have is None elsewhere.
        keys = {"solution"}.union(*rows) - _NOT_SENT
        columns = {key: [row.get(key) for row in rows] for key in sorted(keys)}
        values, failures = {}, {}
        with self._lock:
            for name in self.weights:
                result, problem = (self._call_isolated(name, completions, columns) if self.isolate
                                   else _run_reward(self._funcs[name], completions, columns))
                if problem is not None:
                    self.log(f"reward {name!r} {problem}; "
                             "its values count as missing for this batch")
                    self.failures[name] += 1
                failures[name] = int(problem is not None)
                values[name] = result if result is not None else [None] * len(completions)
        total = [sum(self.weights[name] * v[i] for name, v in values.items() if v[i] is not None)
                 for i in range(len(completions))]
        return RewardResult([float(t) for t in total], values, failures)

    def _call_isolated(self, name: str, completions: list[str], columns: dict[str, list]):
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._conn.send((name, completions, columns))
            if not self._conn.poll(self.timeout_s):
                self._stop()
                return None, f"timed out after {self.timeout_s:g}s"
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(timeout=1)
            code = self._process.exitcode
            self._stop()
            return None, f"killed its worker process (exit code {code})"

    def _start(self) -> None:
        self._stop()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_conn, list(self.weights)),
                                        daemon=True, name="mr1fast-rewards")
        self._process.start()
        child_conn.close()  # so the parent sees EOF if the worker dies
        try:
            ready = (self._conn.recv() if self._conn.poll(_STARTUP_TIMEOUT_S)
                     else "not ready in time")
        except EOFError:
            ready = "it exited before it was ready"
        if ready is not None:
            self._stop()
            raise RuntimeError(f"reward worker process failed to start: {ready}")

    def _stop(self) -> None:
        if self._process is None:
            return
        self._conn.close()
        self._process.terminate()
        self._process.join(timeout=2)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._process = self._conn = None

    def close(self) -> None:
        """Stop the worker process, if any; the runner starts a new one if called again."""
        with self._lock:
            self._stop()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
