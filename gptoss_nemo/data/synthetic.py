"""A small conversational task shipped with the package, whose answers a function can check.

"What is 47 + 385?" -> thinking "47 + 385 = 432." -> final "432". Addition and subtraction, phrased a few
ways; operands of two and three digits (10-999) by default, or of at most `digits` digits (digits=1: 0-9, the
200-fact task a tiny model learns in a few hundred steps). `records(n, seed, digits)` is deterministic;
`answer_is_correct` grades a reply.
"""

from __future__ import annotations

import random
import re

PHRASES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please work out {a} {op} {b}.")
SYSTEM = "You are a calculator. Answer with the number only."


DIGITS = (1, 2, 3)


def _problem(rng: random.Random, digits: int) -> tuple[int, str, int, int]:
    lo, hi = (0 if digits == 1 else 10), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice("+-")
    return a, op, b, a + b if op == "+" else a - b


def records(n: int, seed: int = 0, digits: int = 3) -> list[dict]:
    if digits not in DIGITS:
        raise ValueError(f"digits={digits}: use one of {DIGITS}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, op, b, result = _problem(rng, digits)
        out.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(PHRASES).format(a=a, op=op, b=b)},
            {"role": "assistant", "thinking": f"{a} {op} {b} = {result}.", "content": str(result)},
        ]})
    return out


def answer_is_correct(record: dict, reply: str) -> bool:
    """Whether `reply` (the model's final-channel text) is the right number for `record`'s question."""
    expected = record["messages"][-1]["content"]
    found = re.findall(r"-?\d+", reply)
    return bool(found) and found[-1] == expected
