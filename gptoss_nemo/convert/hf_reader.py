"""Read only what one rank owns from a Hugging Face gpt-oss checkpoint, and count the bytes read.

Tensors are opened lazily (safetensors `get_slice`): an expert-parallel rank reads its experts' rows of the
packed MXFP4 blocks/scales (or of the BF16 experts) and nothing else of them, so with EP=N each rank reads
1/N of the expert bytes. Experts come back in megatron orientation ([out, in], gate/up still interleaved as
in the checkpoint; `mapping.deinterleave_gate_up` makes megatron's [gate; up]).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from gptoss_nemo.checkpoint import mxfp4
from gptoss_nemo.checkpoint.hf_layout import check_tensors, layer_prefix, read_specs, weight_map
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.hf_config import GptOssConfig


class HFReader:
    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint directory")
        self.cfg = GptOssConfig.from_file(self.dir)
        self._specs = read_specs(self.dir)  # headers only; the same check as hf_layout.check_checkpoint
        check_tensors(self.cfg, self._specs, where=str(self.dir))
        self._map = weight_map(self.dir)
        self._files: dict[str, object] = {}
        self.bytes_read = 0
        self.expert_bytes_read = 0

    def _slice(self, name: str):
        fname = self._map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(self.dir / fname, "pt")
        return self._files[fname].get_slice(name)

    def read(self, name: str, rows: slice = slice(None), cols: slice | None = None) -> torch.Tensor:
        """Rows `rows` (dim 0), and columns `cols` (dim 1) if given, of tensor `name`; only those are read."""
        sl = self._slice(name)
        t = sl[rows] if cols is None else sl[rows, cols]
        nbytes = t.numel() * t.element_size()
        self.bytes_read += nbytes
        if ".mlp.experts." in name:
            self.expert_bytes_read += nbytes
        return t

    def experts(self, layer: int, first: int, count: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
        """Experts first..first+count-1 of `layer`: fc1 [n, 2I, H], fc2 [n, H, I] (dequantized), and biases."""
        p, rows = layer_prefix(layer) + "mlp.experts.", slice(first, first + count)
        out = {"gate_up_proj_bias": self.read(p + "gate_up_proj_bias", rows),
               "down_proj_bias": self.read(p + "down_proj_bias", rows)}
        for proj in ("gate_up_proj", "down_proj"):
            if self.cfg.quantized:
                blocks, scales = self.read(p + proj + "_blocks", rows), self.read(p + proj + "_scales", rows)
                out[proj] = mxfp4.dequantize(blocks, scales, dtype)
            else:
                out[proj] = self.read(p + proj, rows).transpose(1, 2).to(dtype)
        return out

    def expert_bytes_total(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for name, (shape, dtype) in self._specs.items()
                   if ".mlp.experts." in name)
