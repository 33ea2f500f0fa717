"""Hugging Face BF16 gpt-oss tensors -> the openai/gpt-oss MXFP4 layout, one tensor at a time.

The expert weights `mlp.experts.gate_up_proj [E, H, 2I]` (gate/up interleaved on the last axis) and
`mlp.experts.down_proj [E, I, H]` become `*_blocks [E, rows, K/32, 16]` + `*_scales [E, rows, K/32]` of their
transposes (rows = output features, as openai/gpt-oss stores them); everything else (attention, router, biases,
norms, embeddings, output layer, sinks) passes through in BF16. The codec is checkpoint/mxfp4.py: each block's
E8M0 scale 2**ceil(log2(amax / 6)) and E2M1 rounding to nearest with ties to even, as ModelOpt's CUDA fake quant
computes them, so an MXFP4-trained (QAT) weight is written exactly as its forward pass used it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from gptoss_nemo.checkpoint import mxfp4

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantize_experts(w: torch.Tensor, device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] BF16 -> (blocks [E, out, in/32, 16], scales [E, out, in/32]) on the CPU, one expert at a time
    (the codec's FP32 temporaries stay at one expert's size: gpt-oss-120b's gate_up_proj holds 2.1 G elements per
    layer), computed on the GPU when there is one (the codec's arithmetic is exact, so the bytes are the same)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    e, k, rows = w.shape
    blocks = torch.empty(e, rows, k // mxfp4.BLOCK, mxfp4.BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(e, rows, k // mxfp4.BLOCK, dtype=torch.uint8)
    for i in range(e):
        b, s = mxfp4.quantize(w[i].to(device).transpose(0, 1))
        blocks[i], scales[i] = b.cpu(), s.cpu()
    return blocks, scales


def to_mxfp4(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors:
        if name.endswith(EXPERT_WEIGHTS):
            blocks, scales = quantize_experts(t)
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        else:
            yield name, t
