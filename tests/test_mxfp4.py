"""MXFP4 codec: layout rules against a hand-checked table, round trips, and transformers' own dequantization."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_nemo.checkpoint import mxfp4


def test_nibble_order_and_e8m0_bias():
    # Block of 32: element 0 = 1.0 (code 2), element 1 = -6.0 (code 15), rest zero; scale 2**0 -> 127.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x02 | (0x0F << 4)  # low nibble = even element
    scales = torch.full((1, 1), 127, dtype=torch.uint8)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    assert w.shape == (1, 32)
    assert w[0, 0].item() == 1.0 and w[0, 1].item() == -6.0 and w[0, 2:].abs().sum().item() == 0
    scales[0, 0] = 130  # 2**3
    assert mxfp4.dequantize(blocks, scales, torch.float32)[0, :2].tolist() == [8.0, -48.0]


# Scaled value -> E2M1 value; ties go to the even code (codes: 0 0.5 1 1.5 2 3 4 6).
TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
        (0.3, 0.5), (2.6, 3.0), (5.5, 6.0), (-0.75, -1.0), (-3.5, -4.0), (-5.0, -4.0)]


@pytest.mark.parametrize("x,expected", TIES)
def test_round_to_nearest_even(x, expected):
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = x, 6.0  # amax 6 -> scale 2**0, so x is quantized as is
    q = mxfp4.fake_quantize(w)
    assert q[0, 0].item() == expected


def test_scale_is_ceil_log2_amax_over_6():
    w = torch.zeros(3, 32)
    w[0, 0] = 7.0  # 7/6 -> 2**1
    w[1, 0] = 6.0  # exactly 6 -> 2**0
    w[2, 0] = 0.01  # log2(0.01/6) = -9.2 -> 2**-9
    _, scales = mxfp4.quantize(w)
    assert (scales[:, 0].to(torch.int32) - 127).tolist() == [1, 0, -9]


def test_zero_and_tiny_blocks():
    w = torch.zeros(2, 64)
    w[1, 32] = 1e-40  # subnormal in float32
    blocks, scales = mxfp4.quantize(w)
    assert scales[0].tolist() == [0, 0]  # all-zero block: smallest scale code
    assert (blocks[0] == 0).all()
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32)[0], torch.zeros(64))
    assert torch.isfinite(mxfp4.dequantize(blocks, scales, torch.float32)).all()


def test_fp32_subnormals_count_as_zero_as_in_the_cuda_kernel():
    """ModelOpt's MXFP4 kernel runs with flush-to-zero: a subnormal element quantizes to 0 and does not set its
    block's scale (its neighbours are quantized as if it were 0)."""
    w = torch.zeros(1, 64)
    w[0, :32] = torch.linspace(1, 2, 32) * 1e-39  # a block of FP32 subnormals only
    w[0, 32], w[0, 33], w[0, 34] = 6.0, 3e-39, -1e-38  # a normal block holding two subnormals
    q = mxfp4.fake_quantize(w)
    assert (q[0, :32] == 0).all() and q[0, 32] == 6.0 and q[0, 33] == 0 and q[0, 34] == 0
    _, scales = mxfp4.quantize(w)
    assert scales[0].tolist() == [0, 127]  # the subnormal block: smallest scale; the other: 2**0
    smallest_normal = torch.tensor([[2.0 ** -126] + [0.0] * 31])
    assert mxfp4.fake_quantize(smallest_normal)[0, 0] == 2.0 ** -126  # normal values are kept


def test_round_trip_is_idempotent_and_bounded():
    torch.manual_seed(0)
    w = torch.randn(4, 16, 256) * 0.02
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (4, 16, 8, 16) and scales.shape == (4, 16, 8)
    deq = mxfp4.dequantize(blocks, scales, torch.float32)
    # Representable values come back unchanged (the codes may differ: a block whose max rounded down to 3
    # is re-encoded as 6 at half the scale, the same value).
    assert torch.equal(mxfp4.fake_quantize(deq), deq)
    # Error per element is at most half the largest E2M1 step (2) times the block scale.
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    assert ((deq - w).abs() <= step * 1.0 + 1e-12).all()


def test_dequantize_matches_transformers_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (4, 64, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (4, 64, 2), dtype=torch.uint8, generator=gen)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    ours = mxfp4.dequantize(blocks, scales, torch.bfloat16).transpose(1, 2)
    assert ref.dtype == ours.dtype and torch.equal(ref.view(torch.int16), ours.contiguous().view(torch.int16))


def test_mismatched_blocks_and_scales_are_named():
    blocks = torch.zeros(2, 8, 4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"gate_up_proj_blocks .* and gate_up_proj_scales .* do not match"):
        mxfp4.check_pair(blocks, torch.zeros(2, 8, 3, dtype=torch.uint8), "gate_up_proj")
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(4, 40))


def test_chunked_cpu_quantize_equals_one_pass(monkeypatch):
    """Large CPU tensors are quantized a chunk of rows at a time; the codes and scales are those of one pass, with
    chunks that split the rows unevenly, and with zeros, subnormals and ties in them."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 37, 96, generator=g) * 0.02).to(torch.bfloat16)
    w[0, 0, :32] = 0
    w[1, 2, 5] = 1e-40
    w[2, 1, :4] = torch.tensor([0.25, 0.75, 1.25, 6.0])  # ties between E2M1 values under a scale of 1
    monkeypatch.setattr(mxfp4, "CPU_CHUNK_ELEMENTS", 96 * 5)
    chunked = mxfp4.quantize(w)
    whole = mxfp4._quantize_rows(w)
    assert [t.shape for t in chunked] == [t.shape for t in whole]
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
