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


def to_mxfp4(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors:
        if name.endswith(EXPERT_WEIGHTS):
            blocks, scales = mxfp4.quantize(t.transpose(-1, -2))
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        else:
            yield name, t
