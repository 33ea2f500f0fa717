"""Does a serving engine compute what the reference computes? The rules, in one place, that the vLLM tests and
`gptoss-nemo verify-export --engine vllm` hold a served export to.

The engine reports, at every position it was asked about, the token it ranks first and that token's logprob:
teacher-forced positions of whole sequences (prompt logprobs) and the steps of its own greedy continuations. The
reference (transformers on an export, or the megatron checkpoint) is run on the same tokens and gives, at each of
those positions, its own first token, its top-2 margin (logprob of its first minus its second token) and its
logprob of the engine's token. A `Position` holds both; `compare` applies a `Rule`:

    exact     (an unquantized export served in FP32): the engine's token is the reference's first token at every
              position, so its greedy continuations are the reference's, and every logprob is within 1e-5
    near-tie  (BF16 serving, FP4 experts): at teacher-forced positions the tokens agree wherever the reference's
              top-2 margin exceeds 0.05 (issue 24's rule: below that, BF16 rounding alone may flip a choice), and
              the logprob of each prompt's first generated token is within 0.03; the greedy steps are counted and
              reported, not held to the margin (issue 24 holds the teacher-forced argmax to it)

0.03, not issue 24's 0.01: vLLM 0.32's BF16 CPU path on the tiny QAT-like MXFP4 export of tests/test_vllm_export.py
puts one of its four first generated tokens 0.019 (AMX kernels) or 0.023 (vLLM told the CPU has no AMX) off
transformers' BF16 (0.020/0.024 off transformers' FP32), inside BF16's own noise there (transformers' BF16 is up to
0.052 off its FP32 at teacher-forced positions, vLLM's up to 0.065). The README's "Serving engines checked" gives
the numbers. A wrong export (E8M0 scales one step off) misses both by far: 268 teacher-forced positions beyond the
margin, first generated token 0.46 off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    margin: float | None  # first tokens must agree where the reference's top-2 margin exceeds it (None: everywhere)
    greedy_tokens: bool  # the margin (or exact agreement) also holds at the engine's greedy steps
    logprob_tol: float | None  # |engine - reference| logprob of the engine's token at every position (None: unchecked)
    first_token_tol: float  # the same for each prompt's first generated token

    def describe(self) -> str:
        where = "everywhere" if self.margin is None else f"where the reference's top-2 margin > {self.margin:g}"
        if not self.greedy_tokens:
            where = f"at teacher-forced positions {where}"
        text = f"{self.name} rule: the top-1 token agrees {where}"
        if self.logprob_tol is not None:
            text += f", every logprob within {self.logprob_tol:g}"
        return text + f", first generated token's logprob within {self.first_token_tol:g}"


EXACT = Rule("exact", margin=None, greedy_tokens=True, logprob_tol=1e-5, first_token_tol=1e-5)
NEAR_TIE = Rule("near-tie", margin=0.05, greedy_tokens=False, logprob_tol=None, first_token_tol=0.03)


def rule_for(dtype: str, quantized: bool) -> Rule:
    """EXACT for an unquantized export served in FP32; NEAR_TIE otherwise."""
    return EXACT if dtype == "float32" and not quantized else NEAR_TIE


@dataclass(frozen=True, slots=True)
class Position:
    generated: bool  # a step of the engine's greedy continuation (else a teacher-forced position)
    first: bool  # the first generated token of a prompt
    token: int  # the engine's first-ranked token
    logprob: float  # the engine's logprob of it
    ref_token: int  # the reference's first-ranked token
    ref_margin: float  # the reference's top-2 margin
    ref_logprob: float  # the reference's logprob of the engine's token

    @property
    def agrees(self) -> bool:
        return self.token == self.ref_token

    @property
    def dlogprob(self) -> float:
        return abs(self.logprob - self.ref_logprob)


@dataclass(slots=True)
class Agreement:
    rule: Rule
    positions: int = 0
    agreed: int = 0
    checked: int = 0  # positions where the rule demands agreement (the reference's margin above the rule's)
    greedy_beyond_margin: int = 0  # greedy steps that differ beyond the margin (a failure only where the rule says)
    generated: int = 0  # greedy steps compared
    generated_agreed: int = 0
    near_tie_disagreements: int = 0  # disagreements where the rule allows them
    largest_disagreement_margin: float = 0.0  # the reference's margin at the worst disagreement
    max_dlogprob: float = 0.0
    first_token_max_dlogprob: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.positions > 0 and not self.failures

    def summary(self) -> str:
        text = f"top-1 token agrees at {self.agreed}/{self.positions} positions"
        if self.checked < self.positions:
            text += f" ({self.checked} held to the rule's margin)"
        if self.positions > self.agreed:
            text += f"; {self.positions - self.agreed} differ, {self.near_tie_disagreements} at near ties, the " \
                    f"largest reference margin where they differ {self.largest_disagreement_margin:.4f}"
            if self.greedy_beyond_margin:
                text += f" ({self.greedy_beyond_margin} greedy steps beyond the margin, reported only)"
        if self.generated:
            text += f", greedy {self.generated_agreed}/{self.generated} tokens"
        text += f", max |dlogprob| {self.max_dlogprob:.2e}"
        if self.generated:
            text += f", first generated token max |dlogprob| {self.first_token_max_dlogprob:.2e}"
        return text + (": PASS" if self.ok else ": FAIL (" + "; ".join(self.failures) + ")")

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rule"}, "rule": self.rule.name, "ok": self.ok,
                "summary": self.summary()}


def _demanded(rule: Rule, p: Position) -> bool:
    """Does the rule demand that the tokens agree at p?"""
    return (rule.greedy_tokens or not p.generated) and (rule.margin is None or p.ref_margin > rule.margin)


def compare(positions: list[Position], rule: Rule) -> Agreement:
    a = Agreement(rule)
    beyond = 0  # disagreements the rule does not allow
    for p in positions:
        a.positions += 1
        a.agreed += p.agrees
        a.generated += p.generated
        a.generated_agreed += p.generated and p.agrees
        a.max_dlogprob = max(a.max_dlogprob, p.dlogprob)
        a.checked += _demanded(rule, p)
        if p.first:
            a.first_token_max_dlogprob = max(a.first_token_max_dlogprob, p.dlogprob)
        if not p.agrees:
            a.largest_disagreement_margin = max(a.largest_disagreement_margin, p.ref_margin)
            if _demanded(rule, p):
                beyond += 1
            else:
                a.near_tie_disagreements += rule.margin is not None and p.ref_margin <= rule.margin
                a.greedy_beyond_margin += rule.margin is None or p.ref_margin > rule.margin
    if not a.positions:
        a.failures.append("no position compared")
    if beyond:
        where = "" if rule.margin is None else f" where the reference's margin exceeds {rule.margin:g}"
        a.failures.append(f"the top-1 token differs at {beyond} positions{where}")
    if rule.logprob_tol is not None and a.max_dlogprob > rule.logprob_tol:
        a.failures.append(f"max |dlogprob| {a.max_dlogprob:.2e} > {rule.logprob_tol:g}")
    if a.first_token_max_dlogprob > rule.first_token_tol:
        a.failures.append(f"first generated token |dlogprob| {a.first_token_max_dlogprob:.2e} > "
                          f"{rule.first_token_tol:g}")
    return a
