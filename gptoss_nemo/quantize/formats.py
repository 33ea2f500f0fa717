"""Quantization formats for the expert MLPs and the ModelOpt configurations that apply them.

    mxfp4        MXFP4 weights (E2M1 values, one E8M0 scale per 32), activations BF16: what openai/gpt-oss
                 ships and vLLM / SGLang / TensorRT-LLM serve. ModelOpt's MXFP4_MLP_WEIGHT_ONLY_CFG.
    nvfp4        NVFP4 weights (E2M1, one E4M3 scale per 16, one FP32 scale per tensor), activations BF16:
                 NVFP4_MLP_WEIGHT_ONLY_CFG with blocks of 16 (the preset uses 32; NVFP4 checkpoints and kernels
                 use 16: ModelOpt's W4A16_NVFP4 / NVFP4 exports write group_size 16).
    nvfp4_w4a4   NVFP4 weights and activations of the MLPs (Blackwell FP4 GEMMs): NVFP4_MLP_ONLY_CFG.

The presets enable every quantizer under `*mlp*` and disable the router (`*router*`), the output layer and
everything else; in megatron's gpt-oss every MLP is an MoE expert (`decoder.layers.N.mlp.experts...`), so they
select exactly the expert linear layers (tests/test_qat_config.py applies their rules to the model's names).
Weight scales need no data (MXFP4's are per block; NVFP4's per-tensor second-level scale is the weight's amax,
which ModelOpt computes from the weights alone); formats that quantize activations (`calibrate`) run a forward
loop over training batches before QAT / PTQ to set the activations' amax.

NVFP4's per-tensor scale is shared by all experts of a layer's projection (`sync_expert_weight_amax`: the max
over the experts of every EP rank), because the Hugging Face gpt-oss layout stores the experts as one fused tensor
per projection with one `weight_scale_2` (ModelOpt's own GptOss export, TensorRT-LLM's loader): QAT then trains
with the scale the checkpoint will carry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Format:
    preset: str  # the name of the config in modelopt.torch.quantization
    calibrate: bool  # a calibration forward loop is needed (activation amax)
    block: int | None = None  # override of the preset's block size (elements per scale)
    shared_expert_scale: bool = False  # one per-tensor weight scale per layer projection, shared by its experts


FORMATS = {
    "mxfp4": Format("MXFP4_MLP_WEIGHT_ONLY_CFG", calibrate=False),
    "nvfp4": Format("NVFP4_MLP_WEIGHT_ONLY_CFG", calibrate=False, block=16, shared_expert_scale=True),
    "nvfp4_w4a4": Format("NVFP4_MLP_ONLY_CFG", calibrate=True, block=16, shared_expert_scale=True),
}


def modelopt_config(fmt: str) -> dict:
    """A private copy of ModelOpt's preset for `fmt`, with the format's block size and scale sharing."""
    import modelopt.torch.quantization as mtq

    f = FORMATS[fmt]
    config = copy.deepcopy(getattr(mtq, f.preset))
    if f.block is not None:
        for entry in config["quant_cfg"]:
            blocks = (entry.get("cfg") or {}).get("block_sizes")
            if blocks and -1 in blocks:
                blocks[-1] = f.block
    if f.shared_expert_scale:
        algorithm = config.get("algorithm") or "max"
        config["algorithm"] = {**({"method": algorithm} if isinstance(algorithm, str) else algorithm),
                               "sync_expert_weight_amax": True}
    return config
