"""HF <-> megatron layout transforms on random tensors: QKV fuse/split under GQA, gate/up interleave, names."""

import pytest
import torch

from gptoss_nemo.convert.mapping import (
    check_names,
    deinterleave_gate_up,
    expert_name,
    interleave_gate_up,
    megatron_layer_names,
    qkv_fuse,
    qkv_split,
)
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.presets import gpt_oss_20b, tiny


@pytest.mark.parametrize("make", [tiny, gpt_oss_20b])
def test_qkv_fuse_layout_and_round_trip(make):
    cfg = make()
    d, h, heads, groups = cfg.head_dim, 8, cfg.num_attention_heads, cfg.num_key_value_heads
    # Row r of q is head r // d; fill each row with its head id so the layout is readable.
    q = torch.arange(heads).repeat_interleave(d).unsqueeze(1).expand(-1, h).float()
    k = 1000 + torch.arange(groups).repeat_interleave(d).unsqueeze(1).expand(-1, h).float()
    v = 2000 + torch.arange(groups).repeat_interleave(d).unsqueeze(1).expand(-1, h).float()
    fused = qkv_fuse(cfg, q, k, v)
    per_group = heads // groups
    assert fused.shape == ((heads + 2 * groups) * d, h)
    group0 = fused[: (per_group + 2) * d, 0].reshape(per_group + 2, d)[:, 0].tolist()
    assert group0 == list(range(per_group)) + [1000, 2000]  # group 0: its query heads, its key, its value
    q2, k2, v2 = qkv_split(cfg, fused)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # biases (1-D) use the same layout
    qb, kb, vb = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    assert torch.equal(qkv_fuse(cfg, qb, kb, vb), fused[:, 0])


def test_qkv_tensor_parallel_shard_is_whole_groups():
    cfg = tiny()
    q, k, v = (torch.randn(n * cfg.head_dim, 16) for n in (cfg.num_attention_heads, 2, 2))
    fused = qkv_fuse(cfg, q, k, v)
    shard = torch.chunk(fused, 2, dim=0)[1]  # TP rank 1 of 2 owns query group 1
    q1, k1, v1 = qkv_split(cfg, shard, groups=1)
    per_group_rows = cfg.num_attention_heads // 2 * cfg.head_dim
    assert torch.equal(q1, q[per_group_rows:]) and torch.equal(k1, k[cfg.head_dim:]) and torch.equal(v1, v[cfg.head_dim:])


def test_gate_up_interleave():
    rows = torch.arange(8).float().unsqueeze(1)  # HF rows: g0 u0 g1 u1 g2 u2 g3 u3
    mc = deinterleave_gate_up(rows)
    assert mc[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(interleave_gate_up(mc), rows)
    w = torch.randn(2 * 96, 64)
    assert torch.equal(interleave_gate_up(deinterleave_gate_up(w)), w)


def test_names_for_both_specs():
    assert megatron_layer_names(te=False)["input_layernorm.weight"] == "input_layernorm.weight"
    assert megatron_layer_names(te=True)["input_layernorm.weight"] == "self_attention.linear_qkv.layer_norm_weight"
    assert megatron_layer_names(te=False)["self_attn.sinks"] == "self_attention.core_attention.softmax_offset"
    assert expert_name(3, "linear_fc1.weight", te=False) == "local_experts.3.linear_fc1.weight"
    assert expert_name(3, "linear_fc1.weight", te=True) == "linear_fc1.weight3"


def test_unmatched_names_raise():
    check_names({"a", "b"}, {"a", "b"}, "x")
    with pytest.raises(CheckpointError, match="no mapping filled b"):
        check_names({"a", "b"}, {"a"}, "x")
    with pytest.raises(CheckpointError, match="c has no gpt-oss mapping"):
        check_names({"a"}, {"a", "c"}, "x")
