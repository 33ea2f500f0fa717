"""Which implementation of the one gpt-oss model runs: decided here, once, and passed on as a `ModelImpl`.

    fused      megatron's local spec with this package's fused kernels: flex attention with sinks (packed documents
               kept apart), grouped-GEMM experts, the BF16-reading loss. Exact (FP32 logits = transformers') and
               the fastest measured (benchmarks/RESULTS.md), so `auto` picks it. Needs torch's flex attention with
               its log-sum-exp output and `grouped_mm` (torch >= 2.9).
    te         Transformer Engine's spec (the NeMo container): cuDNN fused attention with sinks (TE >= 2.8),
               TE's grouped GEMM. The one that trains with tp > 1 (sequence parallelism; megatron's local norms
               cannot). Packed documents need its THD attention, whose backward with sinks needs cuDNN >= 9.26
               (`te_packing_problem`; TE 2.20 refuses it before): below that, train with data.packing=false.
    reference  megatron's local spec with megatron's own modules (DotProductAttention, SequentialMLP): simple and
               slow, the baseline the fused kernels are tested against. Packed documents attend to each other.

`auto` (the default): fused; te where the layout trains with tp > 1; where torch lacks fused's kernels, te when
Transformer Engine imports, else reference (the reason is logged and printed by the dry runs). An explicit choice
is never replaced: one that cannot run here is refused with the alternative named. `--local-spec` on the command
line means "not Transformer Engine": it turns te and auto into fused and leaves fused and reference as they are.

Checkpoints do not depend on the implementation (convert/checkpoint_keys.py): any of them loads what another wrote.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass

from gptoss_nemo.errors import ConfigError

log = logging.getLogger(__name__)
IMPLS = ("fused", "te", "reference")
CHOICES = ("auto", *IMPLS)
MIN_TE = "2.8"  # fused attention with learnable softmax offsets (gpt-oss's sinks)
MIN_CUDNN_THD_SINKS = 92600  # cuDNN 9.26: THD (packed-sequence) attention with learnable sinks has a backward


@dataclass(frozen=True, slots=True)
class ModelImpl:
    name: str
    """fused | te | reference"""
    why: str = ""
    """How it was chosen (printed by the dry runs)."""

    def __post_init__(self):
        if self.name not in IMPLS:
            raise ConfigError(f"model.impl={self.name!r}; use one of {', '.join(CHOICES)}")

    @property
    def te(self) -> bool:
        return self.name == "te"


def te_version() -> str | None:
    """The importable Transformer Engine version, or None."""
    try:
        import transformer_engine  # noqa: F401
        from importlib.metadata import version

        return version("transformer_engine")
    except Exception:  # ImportError, or a TE whose CUDA libraries do not load
        return None


def te_problem() -> str | None:
    """Why the te implementation cannot run here, or None."""
    from packaging.version import Version

    version = te_version()
    if version is None:
        return "transformer_engine does not import (it comes with the NeMo container)"
    if Version(version) < Version(MIN_TE):
        return (f"Transformer Engine {version} < {MIN_TE} has no fused attention with learnable sinks, which gpt-oss "
                "needs (NeMo container 25.09 or later has it)")
    return None


def te_packing_problem() -> str | None:
    """Why TE's spec cannot train packed documents (THD attention with sinks) with this cuDNN, or None (also where
    cuDNN cannot be read here: TE checks at the first step). Seen on an H200 with cuDNN 9.19 and TE 2.20.2:
    "Known cuDNN < 9.26.0 issue with THD learnable softmax backward. Please upgrade cuDNN." """
    import torch

    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if version is None or version >= MIN_CUDNN_THD_SINKS:
        return None
    return (f"cuDNN {version // 10000}.{version % 10000 // 100} < 9.26 has no backward for Transformer Engine's "
            "packed-sequence (THD) attention with sinks")


def fused_problem() -> str | None:
    """Why the fused kernels cannot run with this torch, or None."""
    import torch
    import torch.nn.functional as F

    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: F401
    except ImportError:
        return (f"torch {torch.__version__} has no flex attention with AuxRequest (its log-sum-exp output carries the "
                "sinks)")
    if "return_aux" not in inspect.signature(flex_attention).parameters:
        return f"torch {torch.__version__}'s flex_attention has no return_aux argument"
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch.compile builds the fused kernels with it)"
    return None


def with_local_spec(requested: str, local_spec: bool) -> str:
    """The command line's `--local-spec`: megatron's local spec, i.e. anything but te (te and auto -> fused)."""
    return "fused" if local_spec and requested in ("auto", "te") else requested


def resolve_impl(requested: str | ModelImpl = "auto", *, layout=None, training: bool = False,
                 here: bool = True) -> ModelImpl:
    """The implementation to run for `requested` (a recipe's model.impl or --impl), the layout and what is installed.
    A resolved ModelImpl is returned as it is. Raises ConfigError when the asked-for implementation cannot run.
    here=False plans for another machine (a Slurm job's container: launch, plan), assumed to have what it needs."""
    if isinstance(requested, ModelImpl):
        return requested
    if requested not in CHOICES:
        raise ConfigError(f"model.impl={requested!r}; use one of {', '.join(CHOICES)}")
    tp_training = training and layout is not None and layout.tp > 1
    te_bad, fused_bad = (te_problem(), fused_problem()) if here else (None, None)
    if requested == "auto":
        if tp_training and te_bad is None:
            return ModelImpl("te", f"auto: training with tp={layout.tp} needs Transformer Engine's spec")
        if tp_training:  # nothing can run it; the layout check names the fix
            return ModelImpl("fused", f"auto: fused (tp={layout.tp} training needs Transformer Engine: {te_bad})")
        if fused_bad is None:
            return ModelImpl("fused", "auto: the fused local kernels (exact and fastest measured)")
        if te_bad is None:
            log.warning("model.impl=auto: %s; using Transformer Engine's spec", fused_bad)
            return ModelImpl("te", f"auto: te because {fused_bad}")
        log.warning("model.impl=auto: %s, and %s; using megatron's reference modules", fused_bad, te_bad)
        return ModelImpl("reference", f"auto: reference because {fused_bad} and {te_bad}")
    if requested == "te" and te_bad is not None:
        raise ConfigError(f"model.impl=te: {te_bad}; use model.impl=fused (megatron's local spec, --local-spec)")
    if requested == "fused" and fused_bad is not None:
        other = "te" if te_bad is None else "reference"
        raise ConfigError(f"model.impl=fused: {fused_bad}; use model.impl={other}")
    return ModelImpl(requested, "asked for")
