"""Small conversational tasks shipped with the package, whose answers a function can check.

"What is 47 + 385?" -> thinking "47 + 385 = 432." -> final "432". `arithmetic`: addition and subtraction, phrased
a few ways; operands of two and three digits (10-999) by default, or of at most `digits` digits (digits=1: 0-9,
the 200-fact task a tiny model learns in a few hundred steps). `multiplication`: the same conversations with
"a * b" (digits=1: the 100 one-digit products), new facts for a model that knows addition (the QAT/PTQ miniature:
recipes/qat_table_base.yaml, recipes/qat_table.yaml). `records(n, seed, digits, task)` is deterministic;
`answer_is_correct` grades a reply.
"""

from __future__ import annotations

import operator
import random
import re

PHRASES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please work out {a} {op} {b}.")
SYSTEM = "You are a calculator. Answer with the number only."


DIGITS = (1, 2, 3)
TASKS = {"arithmetic": "+-", "multiplication": "*"}  # task -> the operators its questions draw from
_RESULT = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _problem(rng: random.Random, digits: int, ops: str) -> tuple[int, str, int, int]:
    lo, hi = (0 if digits == 1 else 10), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice(ops)
    return a, op, b, _RESULT[op](a, b)


def records(n: int, seed: int = 0, digits: int = 3, task: str = "arithmetic") -> list[dict]:
    if digits not in DIGITS:
        raise ValueError(f"digits={digits}: use one of {DIGITS}")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, op, b, result = _problem(rng, digits, TASKS[task])
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
