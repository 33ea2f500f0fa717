"""MXFP4 (OCP microscaling FP4) codec in the openai/gpt-oss checkpoint layout.

A weight `W[..., rows, K]` (rows = output features, K = input features, K a multiple of 32) is stored as
  blocks  uint8 `[..., rows, K/32, 16]`: 32 E2M1 codes per block, two per byte, element 2j in the LOW
          nibble and element 2j+1 in the HIGH nibble;
  scales  uint8 `[..., rows, K/32]`: one E8M0 exponent per block with bias 127 (value = 2**(s - 127)).
E2M1 code c encodes sign (bit 3) and magnitude FP4_MAGNITUDES[c & 7] in {0, .5, 1, 1.5, 2, 3, 4, 6}.

Quantization picks each block's scale as ModelOpt does, 2**ceil(log2(amax / 6)) (so no element exceeds 6
after scaling; an all-zero block gets scale code 0), and rounds to the nearest E2M1 value with ties to the
even code, as ModelOpt's CUDA fake quant does. (ModelOpt's `MXFP4QTensor.quantize` rounds ties toward zero
instead; this module never does.) That kernel is compiled with --use_fast_math, so FP32-subnormal inputs
(|w| < 2**-126, about 1.2e-38) count as zero there: they are flushed here too (measured on an H200: without the
flush, exactly the subnormal elements of an adversarial tensor differed; real weights never come near).

Dequantization reproduces `transformers`' `convert_moe_packed_tensors` bit for bit: a lookup in the target
dtype followed by `torch.ldexp` with the unbiased exponent.
"""

from __future__ import annotations

import torch

BLOCK = 32  # elements per scale
FP32_MIN_NORMAL = 2.0 ** -126
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = FP4_MAGNITUDES + tuple(-v for v in FP4_MAGNITUDES)  # code -> value (code 8 is -0.0)
E8M0_BIAS = 127
E2M1_MAX = 6.0


def check_pair(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError unless `blocks`/`scales` form a valid MXFP4 pair."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"{name}_blocks: last dimension must be {BLOCK // 2} bytes, got shape {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"{name}_blocks {tuple(blocks.shape)} and {name}_scales {tuple(scales.shape)} do not match: "
            f"scales must be blocks.shape[:-1]"
        )


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`[..., rows, K/32, 16]` + `[..., rows, K/32]` -> `[..., rows, K]` in `dtype` (transformers' exact values)."""
    check_pair(blocks, scales)
    *prefix, groups, half = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*prefix, groups, half * 2, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1), out=out)
    return out.reshape(*prefix, groups * half * 2)


# Midpoints between consecutive E2M1 magnitudes; at a midpoint (a tie) the even code wins, so the comparison is
# `>=` where the upper code is even and `>` where it is odd.
_MIDPOINTS = tuple((lo + hi) / 2 for lo, hi in zip(FP4_MAGNITUDES, FP4_MAGNITUDES[1:]))


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code for each element of x (|x| <= 6), ties to the even code."""
    a = x.abs().float()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(_MIDPOINTS):
        code += (a >= mid) if (k + 1) % 2 == 0 else (a > mid)
    sign = (torch.signbit(x) & (code != 0)).to(torch.uint8) << 3  # no negative zero codes
    return code | sign


def flush_subnormals(w: torch.Tensor) -> torch.Tensor:
    """w in FP32 with FP32-subnormal values set to zero (as the CUDA kernel's flush-to-zero arithmetic sees them)."""
    w = w.float()
    return torch.where(w.abs() < FP32_MIN_NORMAL, torch.zeros_like(w), w)


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """Unbiased E8M0 exponent per block of 32 along the last dim: ceil(log2(amax / 6)), at least -127; computed
    exactly from the binary exponent (frexp), the same on every device. `w` already flushed."""
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    mantissa, exp = torch.frexp(amax / E2M1_MAX)  # amax / 6 = mantissa * 2**exp, mantissa in [0.5, 1)
    exp = torch.where(mantissa == 0.5, exp - 1, exp)  # an exact power of two: log2 is exp - 1
    exp = torch.where(amax == 0, torch.full_like(exp, -E8M0_BIAS), exp)
    return exp.clamp(min=-E8M0_BIAS, max=E8M0_BIAS).to(torch.int32)


# On the CPU, rows are quantized this many elements at a time: the dozen elementwise passes then run in cache
# instead of streaming the whole tensor through memory each time (2.3x faster, one thread, on [2, 5760, 2880]).
CPU_CHUNK_ELEMENTS = 1 << 20


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., rows, K]` float -> (blocks uint8 `[..., rows, K/32, 16]`, scales uint8 `[..., rows, K/32]`)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {tuple(w.shape)}")
    if w.is_cuda or w.numel() <= CPU_CHUNK_ELEMENTS:
        return _quantize_rows(w)
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, CPU_CHUNK_ELEMENTS // w.shape[-1])
    parts = [_quantize_rows(rows[i:i + step]) for i in range(0, rows.shape[0], step)]
    return (torch.cat([b for b, _ in parts]).reshape(*w.shape[:-1], -1, BLOCK // 2),
            torch.cat([s for _, s in parts]).reshape(*w.shape[:-1], -1))


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(w).all():
        raise ValueError("MXFP4 quantize: weight has NaN or Inf values")
    w = flush_subnormals(w)
    exp = block_scales(w)
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    scaled = groups / torch.exp2(exp.float()).unsqueeze(-1)
    codes = _e2m1_codes(scaled)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + E8M0_BIAS).to(torch.uint8)


def fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """quantize then dequantize, in w's dtype: the values an MXFP4 forward pass computes with."""
    blocks, scales = quantize(w)
    return dequantize(blocks, scales, dtype=w.dtype)
