"""The embedded synthetic reasoning task: multi-digit addition with a short worked solution.

A problem ``a+b=`` is answered column by column from the least significant digit, each column as
``x+y+carry=SS`` (two digits), then ``;`` and the final sum, e.g. ``47+38=`` -> ``7+8+0=15,4+3+1=08;85``.
The worked solution makes the task learnable by a tiny model in minutes, and gives the teacher a
token-level signal on every step a student can get wrong.

Splits are assigned by a hash of the problem, so the teacher's training data, the SFT prompts, the
OPD prompts and the evaluation problems never overlap, whatever the sizes asked for.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

# Hash buckets (of 100) per split; disjoint by construction.
SPLITS: dict[str, range] = {
    "eval": range(0, 10),
    "opd": range(10, 25),
    "sft": range(25, 40),
    "teacher": range(40, 100),
}

ANSWER_RE = re.compile(r";\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        return worked_solution(self.a, self.b)

    @property
    def prompt_id(self) -> str:
        return f"add-{self.a}-{self.b}"


# How a teacher writes each column. "columns" is the task's own style (``7+8+0=15``); "sum_first"
# (``15=7+8+0``) is the same computation in another order, for a teacher whose answers are a different
# distribution over the same characters: the teacher-consistency finding needs one (METHODS §2).
SOLUTION_STYLES = ("columns", "sum_first")


def worked_solution(a: int, b: int, style: str = "columns") -> str:
    if style not in SOLUTION_STYLES:
        raise ValueError(f"unknown solution style {style!r}; choose one of {SOLUTION_STYLES}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}" if style == "columns" else f"{s:02d}={x}+{y}+{carry}")
        carry = s // 10
    return ",".join(steps) + f";{a + b}"


def split_of(a: int, b: int) -> str:
    bucket = int.from_bytes(hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest(), "big") % 100
    for name, buckets in SPLITS.items():
        if bucket in buckets:
            return name
    raise AssertionError(bucket)


def sample_problems(split: str, n: int, digits: tuple[int, ...] = (3,), seed: int = 0) -> list[Problem]:
    """``n`` distinct problems from ``split`` whose operands have a digit count drawn from ``digits``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    rng = random.Random(f"{split}-{seed}-{digits}")
    seen: set[tuple[int, int]] = set()
    out: list[Problem] = []
    capacity = sum((9 * 10 ** (d - 1) if d > 1 else 10) ** 2 * len(SPLITS[split]) // 100 for d in set(digits))
    if n > capacity * 0.9:
        raise ValueError(
            f"asked for {n} problems from split {split!r} with digits {digits}; it holds about {capacity}"
        )
    while len(out) < n:
        d = rng.choice(digits)
        lo, hi = (0 if d == 1 else 10 ** (d - 1)), 10**d - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen or split_of(a, b) != split:
            continue
        seen.add((a, b))
        out.append(Problem(a, b))
    return out


def extract_answer(text: str) -> str | None:
    """The final answer after the last ``;``, or None when the response is malformed."""
    match = ANSWER_RE.search(text.strip())
    return match.group(1) if match else None


PROMPT_RE = re.compile(r"^\d+\+\d+=$")


def is_toy_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is one of this task's problems (``a+b=``)."""
    return bool(PROMPT_RE.match(prompt.strip()))


def grade(response: str, reference: str) -> float:
    """1.0 when the extracted final answer equals the reference (as an integer), else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    try:
        return float(int(answer) == int(reference))
    except ValueError:
        return 0.0


def to_records(problems: list[Problem], with_solution: bool = False) -> list[dict]:
    """Problems as prompt-set records (``prompt_id``, ``prompt``, ``answer``[, ``solution``])."""
    rows = []
    for p in problems:
        row = {"prompt_id": p.prompt_id, "prompt": p.prompt, "answer": p.answer}
        if with_solution:
            row["solution"] = p.solution
        rows.append(row)
    return rows
