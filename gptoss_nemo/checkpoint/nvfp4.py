"""NVFP4 codec as ModelOpt's NVFP4 fake quant computes it (the values QAT trained with).

A weight `W[rows, K]` (rows = output features, K = input features, K a multiple of 16) with its per-tensor amax:
  global scale  gs = amax / (6 * 448)                                 FP32 (written as `weight_scale_2`)
  block scale   s8 = E4M3(min(block_amax / (6 * gs), 448))            per 16 elements along K (`weight_scale`)
                S  = s8 * gs, and S = 1 where S < 1e-5 (the kernel's guard: such a block's elements, all under
                     about 7e-5, quantize to code 0, so E2M1(code) * s8 * gs = 0 as well: the stored s8 is kept)
  codes         nearest E2M1 magnitude of |w| / S, ties to the even code (0.25 -> 0, 0.75 -> 1, ...), sign bit 3
  packed        uint8 [rows, K/2]: element 2j in the low nibble, 2j+1 in the high nibble
Dequantized value: E2M1(code) * S, in FP32, as the fake quant forms it (q_val * (s8 * gs)).

ModelOpt's kernel (modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py, on Hopper and later; a CUDA
extension elsewhere) is Triton, whose FP32 division is not IEEE-rounded (PTX div.full.f32, within 2 ulp): an
element whose |w| / S lies within an ulp or two of a rounding boundary (frequent when weights sit on a coarse grid,
e.g. after starting from MXFP4) can get the other code there. `quantize(..., fake=q)` therefore takes the fake
quant's own FP32 output for w (ModelOpt's quantizer run on the GPU, as the export does) and returns the codes and
block scales that reproduce it exactly: each block keeps the IEEE scale or moves to an adjacent E4M3 value, its
codes are read off q / S, and E2M1(code) * S == q is checked for every element.
"""

from __future__ import annotations

import torch

from gptoss_nemo.checkpoint.mxfp4 import FP4_VALUES, _e2m1_codes

BLOCK = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)


def quantize(w: torch.Tensor, amax: torch.Tensor | float, fake: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, K] -> (packed uint8 [rows, K/2], block scales float8_e4m3fn [rows, K/16], global scale FP32 []).
    `fake`: the fake quant's FP32 output for w; the result then dequantizes to exactly it (module docstring)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {BLOCK}, got {tuple(w.shape)}")
    gs = global_scale(amax).to(w.device)
    if not gs > 0:
        raise ValueError(f"NVFP4: the per-tensor amax must be positive, got {float(amax)}")
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    s8 = torch.clamp(block_amax / (6.0 * gs), max=E4M3_MAX).to(torch.float8_e4m3fn)
    if fake is None:
        codes = _e2m1_codes(blocks / _scale(s8, gs).unsqueeze(-1))
    else:
        codes, s8 = _match(fake.float().reshape(blocks.shape), s8, gs)
    codes = codes.reshape(w.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), s8.contiguous(), gs


def _scale(s8: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """S = s8 * gs in FP32, 1 where S < 1e-5 (the kernel's guard)."""
    scale = s8.float() * gs
    return torch.where(scale >= 1e-5, scale, torch.ones_like(scale))


def _match(fake: torch.Tensor, s8: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [..., blocks, 16], s8 [..., blocks]) with E2M1(code) * S == fake on every element, trying each
    block's IEEE scale first, then the E4M3 values next to it; raises if a block has none."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=fake.device)
    bits = s8.view(torch.uint8).to(torch.int16)  # positive E4M3 values are ordered like their bits
    codes = torch.zeros(fake.shape, dtype=torch.uint8, device=fake.device)
    chosen = torch.zeros(s8.shape, dtype=torch.uint8, device=fake.device)
    done = torch.zeros(s8.shape, dtype=torch.bool, device=fake.device)
    for step in (0, -1, 1):
        cand = (bits + step).clamp(0, 0x7E).to(torch.uint8)
        scale = _scale(cand.view(torch.float8_e4m3fn), gs).unsqueeze(-1)
        c = _e2m1_codes(fake / scale)
        ok = ((lut[c.to(torch.int64)] * scale) == fake).all(dim=-1) & ~done
        codes[ok], chosen[ok] = c[ok], cand[ok]
        done |= ok
    if not bool(done.all()):
        raise ValueError(f"NVFP4: {int((~done).sum())} of {done.numel()} blocks of the fake-quantized weight are not "
                         "E2M1 x (E4M3 scale x global scale) of any scale near the weight's own: not this format's "
                         "fake quant, or another per-tensor amax")
    return codes, chosen.view(torch.float8_e4m3fn)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `quantize`: E2M1(code) * (s8 * gs) in FP32, then `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    values = lut[codes.to(torch.int64)]
    scale = (scales.float() * gs.float()).repeat_interleave(BLOCK, dim=-1)
    return (values * scale).to(dtype)


def fake_quantize(w: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    return dequantize(*quantize(w, amax), dtype=w.dtype)
