"""A small conversational task shipped with the package, whose answers a function can check.

"What is 47 + 385?" -> thinking "47 + 385 = 432." -> final "432". Two- and three-digit addition and
subtraction, phrased a few ways. `records(n, seed)` is deterministic; `answer_is_correct` grades a reply.
"""

from __future__ import annotations

import random
import re

PHRASES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please work out {a} {op} {b}.")
SYSTEM = "You are a calculator. Answer with the number only."


def _problem(rng: random.Random) -> tuple[int, str, int, int]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    op = rng.choice("+-")
    return a, op, b, a + b if op == "+" else a - b


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, op, b, result = _problem(rng)
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
