"""Workarounds for bugs in the installed megatron-core, each applied only where the installed code has the bug.

Every patch detects the bug in the installed source (not by version number alone), so a fixed release is
left untouched, and a changed one that no longer contains the exact line is left alone too: the tests that
exercise the path then tell whether the workaround is still needed. `apply_megatron_patches()` is idempotent
and is called by the model builder; it returns the names of the patches in effect.

1. expert_bias_inplace_add — megatron-core 0.19.2, `megatron/core/transformer/mlp.py`, `MLP.forward`:
   for experts with biases (gpt-oss) the fc2 bias is folded in with
       output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)
   where `output` is the output of a custom autograd Function (`_ReduceFromModelParallelRegion`, a view).
   With autograd recording, torch raises "Output 0 of ... is a view and is being modified inplace ... This
   behavior is forbidden". The fix makes that one add out of place. Seen with the local spec (SequentialMLP);
   reproduced on CPU by tests/test_compat.py. Upstream: NVIDIA/Megatron-LM, same file and line (no issue
   was found filed for it as of 2026-11).
"""

from __future__ import annotations

import inspect
import textwrap

_APPLIED: set[str] = set()

_INPLACE_BIAS = "output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"
_OUT_OF_PLACE_BIAS = "output = output + output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"


def _rewrite_method(cls: type, name: str, old: str, new: str) -> bool:
    """Recompile `cls.name` with the single source line `old` replaced by `new`; False if `old` is absent."""
    func = getattr(cls, name)
    source = textwrap.dedent(inspect.getsource(func))
    if source.count(old) != 1:
        return False
    module = inspect.getmodule(func)
    namespace: dict = {}
    code = compile(source.replace(old, new), inspect.getsourcefile(func) or "<patched>", "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - recompiling the installed library's own method
    patched = namespace[name]
    patched.__qualname__ = func.__qualname__
    patched.__doc__ = func.__doc__
    patched.__gptoss_nemo_patched__ = True
    setattr(cls, name, patched)
    return True


def _patch_expert_bias_inplace_add() -> bool:
    from megatron.core.transformer.mlp import MLP

    if getattr(MLP.forward, "__gptoss_nemo_patched__", False):
        return True
    return _rewrite_method(MLP, "forward", _INPLACE_BIAS, _OUT_OF_PLACE_BIAS)


_PATCHES = {"expert_bias_inplace_add": _patch_expert_bias_inplace_add}


def apply_megatron_patches() -> list[str]:
    """Apply every workaround the installed megatron-core needs; return the names in effect."""
    for name, patch in _PATCHES.items():
        if name not in _APPLIED and patch():
            _APPLIED.add(name)
    return sorted(_APPLIED)
