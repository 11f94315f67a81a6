"""Verifiers: does a response's final answer match the reference answer?

- ``math``: the generic verifier for real prompt sets, Hugging Face's ``math-verify`` (the grader of
  open-r1 and TRL). The response's answer is its last ``\\boxed{}`` (boxes listed together, as in
  ``\\boxed{1}, \\boxed{2}``, make one set), else a LaTeX or plain expression ("final answer is ...",
  the last number); the reference is read as the content of a ``\\boxed{}``. Both become SymPy
  objects and are compared as math: ``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``, ``5 cm`` = ``5``,
  intervals, sets (order-free), expressions. An answer that cannot be parsed grades 0; every answer
  gets at most ``MATH_TIMEOUT_S`` seconds.
- ``last_number``: the last number in the response equals the reference number.
- ``addition``: the embedded toy task's format (``...;85``); only for the toy.

Jobs default to ``auto``: ``addition`` when every prompt is a toy problem, else ``math``
(``resolve_verifier``). A real job never grades with the toy's verifier by default.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterable

from lightning_opd.config import check
from lightning_opd.toy.task import grade as grade_addition
from lightning_opd.toy.task import is_toy_prompt

# Seconds one answer may take to parse and compare. SymPy can take minutes on a pathological answer
# (a power tower, a huge factorial); an evaluation must not hang on one response.
MATH_TIMEOUT_S = 5.0


def grade_last_number(response: str, reference: str) -> float:
    """The last number in the response equals the reference number."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    if not numbers:
        return 0.0
    try:
        return float(math.isclose(float(numbers[-1]), float(reference), rel_tol=0, abs_tol=1e-6))
    except ValueError:
        return 0.0


class _OutOfTime(BaseException):
    """Raised by the deadline. A BaseException, because math-verify and SymPy catch ``Exception``
    broadly and would swallow it, then carry on with the next candidate unguarded."""


class _QuietTimeoutNotice(logging.Filter):
    # We pass math-verify timeout None and bound the whole answer ourselves (below); its one-time
    # notice that its own timeout is off would only confuse.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify():
    """(parse, verify, extraction configs); imported on first use (SymPy is slow to load)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutNotice())
    # \boxed{} ranks first (above "the final answer is" patterns), as in open-r1; plain numbers last.
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse, verify, configs


def _reference_text(reference: str) -> str:
    # Datasets give bare answers ("x^{2}+1", "[1,3)", "18"); math-verify reads LaTeX inside
    # delimiters, so a bare one is boxed. One already boxed or in $...$ is read as it is.
    return reference if ("\\boxed" in reference or "$" in reference) else f"\\boxed{{{reference}}}"


def _grade_math_unbounded(response: str, reference: str) -> float:
    parse, verify, configs = _math_verify()
    gold = parse(_reference_text(reference.strip()), configs, parsing_timeout=None)
    answer = parse(response, configs, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=None))


def _with_deadline(fn: Callable[[], float], seconds: float) -> float:
    """``fn()``, or ``_OutOfTime`` after ``seconds``.

    In the main thread a SIGALRM timer interrupts the work itself (math-verify's own timeout is the
    same mechanism, in whole seconds and per step). Signals reach only the main thread: elsewhere the
    work runs in a daemon thread that is abandoned at the deadline (Python cannot stop a thread; it
    finishes, or not, in the background, and the caller moves on).
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def on_alarm(signum, frame):
            raise _OutOfTime

        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True, name="lopd-math-verify")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _OutOfTime
    return result[0] if result else 0.0


def grade_math(response: str, reference: str, *, timeout_s: float = MATH_TIMEOUT_S) -> float:
    """1.0 when the response's final answer equals the reference mathematically (math-verify), else
    0.0: also for an answer that does not parse, and for one that takes longer than ``timeout_s``."""

    def grade() -> float:
        try:
            return _grade_math_unbounded(response, reference)
        except Exception:  # a grader bug or an odd input must not end an evaluation: the answer is wrong
            return 0.0

    try:
        return _with_deadline(grade, timeout_s) if timeout_s and timeout_s > 0 else grade()
    except _OutOfTime:
        warnings.warn(
            f"math verifier: gave up on an answer after {timeout_s:g} s and graded it 0 (a pathological "
            "expression; the rest of the evaluation goes on)",
            stacklevel=2,
        )
        return 0.0


VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "addition": grade_addition,
    "math": grade_math,
    "last_number": grade_last_number,
}
VERIFIER_CHOICES = ("auto", *VERIFIERS)


def check_verifier(name: str) -> None:
    check(name in VERIFIER_CHOICES, f"verifier must be one of {VERIFIER_CHOICES}, got {name!r}")


def infer_verifier(prompts: Iterable[str]) -> str:
    """``addition`` when every prompt is a toy problem (``a+b=``), else ``math``."""
    prompts = list(prompts)
    return "addition" if prompts and all(is_toy_prompt(p) for p in prompts) else "math"


def resolve_verifier(name: str, records) -> str:
    """``name``, or for ``auto`` the verifier inferred from the prompt set's records."""
    check_verifier(name)
    return infer_verifier(r.prompt for r in records) if name == "auto" else name
