"""Pass/fail checkers for generated answers: a task names one (`--checker`), each judges the final-channel text.

    arithmetic        the shipped synthetic task: the last number in the reply is the right result
    contains:TEXT     the reply contains TEXT (case-sensitive)
    regex:PATTERN     the reply matches PATTERN (re.search)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gptoss_nemo.data import synthetic
from gptoss_nemo.errors import ConfigError

Checker = Callable[[dict, str], bool]  # (record, reply) -> passed


def get_checker(spec: str) -> Checker:
    if spec == "arithmetic":
        return synthetic.answer_is_correct
    kind, _, arg = spec.partition(":")
    if kind == "contains" and arg:
        return lambda record, reply: arg in reply
    if kind == "regex" and arg:
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise ConfigError(f"--checker {spec!r}: not a regular expression ({e})") from None
        return lambda record, reply: pattern.search(reply) is not None
    raise ConfigError(f"--checker {spec!r}: use arithmetic, contains:TEXT or regex:PATTERN")
