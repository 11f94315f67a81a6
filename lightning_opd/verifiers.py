"""Verifiers: does a response's final answer match the reference answer?

- ``math``: the generic verifier for real prompt sets. The answer is the content of the last
  ``\\boxed{...}`` when there is one, else the last number in the response; both sides are
  normalised (``$``, spaces, ``\\text{}``, ``\\left``/``\\right``, thousands separators, a trailing
  period) and compared as numbers when both parse (``3/4``, ``\\frac{3}{4}``, ``0.75`` agree), else
  as strings.
- ``last_number``: the last number in the response equals the reference number.
- ``addition``: the embedded toy task's format (``...;85``); only for the toy.

Jobs default to ``auto``: ``addition`` when every prompt is a toy problem, else ``math``
(``resolve_verifier``). A real job never grades with the toy's verifier by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from fractions import Fraction

from lightning_opd.config import check
from lightning_opd.toy.task import grade as grade_addition
from lightning_opd.toy.task import is_toy_prompt

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def grade_last_number(response: str, reference: str) -> float:
    """The last number in the response equals the reference number."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    if not numbers:
        return 0.0
    try:
        return float(math.isclose(float(numbers[-1]), float(reference), rel_tol=0, abs_tol=1e-6))
    except ValueError:
        return 0.0


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def normalize_answer(text: str) -> str:
    """A canonical string form of a final answer (see the module docstring)."""
    s = text.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", "\\%", "%", "\\$"):
        s = s.replace(token, "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)  # (3)/(4) -> 3/4
    return s.lower()


def _as_number(text: str) -> Fraction | None:
    if not NUMBER_RE.fullmatch(text):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(Fraction(num), Fraction(den)) if float(den) != 0 else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_final_answer(response: str) -> str | None:
    """The response's final answer: the last ``\\boxed{}``, else the last number; None if neither."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    numbers = NUMBER_RE.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response))
    return numbers[-1] if numbers else None


def grade_math(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference after normalisation, else 0.0."""
    answer = extract_final_answer(response)
    if answer is None:
        return 0.0
    got, want = normalize_answer(answer), normalize_answer(last_boxed(reference) or reference)
    got_n, want_n = _as_number(got), _as_number(want)
    if got_n is not None and want_n is not None:
        return float(abs(got_n - want_n) <= Fraction(1, 10**6))
    return float(got == want and got != "")


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
