"""Quantization formats for the expert MLPs and the ModelOpt configurations that apply them.

    mxfp4        MXFP4 weights (E2M1 values, one E8M0 scale per 32), activations BF16: what openai/gpt-oss
                 ships and vLLM / SGLang / TensorRT-LLM serve. ModelOpt's MXFP4_MLP_WEIGHT_ONLY_CFG.
    nvfp4        NVFP4-style weights (E2M1, E4M3 scales), activations BF16: NVFP4_MLP_WEIGHT_ONLY_CFG.
    nvfp4_w4a4   NVFP4 weights and activations of the MLPs (Blackwell FP4 GEMMs): NVFP4_MLP_ONLY_CFG.

The presets enable every quantizer under `*mlp*` and disable the router (`*router*`), the output layer and
everything else; in megatron's gpt-oss every MLP is an MoE expert (`decoder.layers.N.mlp.experts...`), so they
select exactly the expert linear layers (tests/test_qat_config.py applies their rules to the model's names).
Weight scales need no data (MXFP4's are per block; NVFP4's per-tensor second-level scale is the weight's amax,
which ModelOpt computes from the weights alone); formats that quantize activations (`calibrate`) run a forward
loop over training batches before QAT / PTQ to set the activations' amax.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Format:
    preset: str  # the name of the config in modelopt.torch.quantization
    calibrate: bool  # a calibration forward loop is needed (activation amax)


FORMATS = {
    "mxfp4": Format("MXFP4_MLP_WEIGHT_ONLY_CFG", calibrate=False),
    "nvfp4": Format("NVFP4_MLP_WEIGHT_ONLY_CFG", calibrate=False),
    "nvfp4_w4a4": Format("NVFP4_MLP_ONLY_CFG", calibrate=True),
}


def modelopt_config(fmt: str) -> dict:
    """A private copy of ModelOpt's preset for `fmt` (mtq.quantize mutates nothing, but callers may)."""
    import modelopt.torch.quantization as mtq

    return copy.deepcopy(getattr(mtq, FORMATS[fmt].preset))
