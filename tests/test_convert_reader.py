"""Rank-local reading of a HF checkpoint: layouts that do not divide, and EP ranks reading only their experts."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.presets import gpt_oss_120b, tiny


@pytest.mark.parametrize(
    "layout,world,message",
    [
        (ParallelLayout(ep=3), 3, "num_local_experts=8 is not divisible by ep=3"),
        (ParallelLayout(tp=4), 4, "num_key_value_heads=2 is not divisible by tp=4"),
        (ParallelLayout(pp=3), 3, "num_hidden_layers=4 is not divisible by pp=3"),
        (ParallelLayout(tp=2, pp=2), 6, "world size 6 is not divisible by tp\\*pp=4"),
        (ParallelLayout(ep=4, pp=2), 4, "world size 4 / pp=2 is not divisible by ep=4"),
    ],
)
def test_layouts_that_do_not_divide(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        layout.validate(tiny(), world)


def test_local_spec_refuses_tensor_parallel_training_only():
    ParallelLayout(tp=2).validate(tiny(), 2, te=True)
    ParallelLayout(tp=2, ep=2).validate(tiny(), 4, te=False, training=False)  # import / export / evaluation
    with pytest.raises(ConfigError, match="training with tp>1 needs Transformer Engine"):
        ParallelLayout(tp=2).validate(tiny(), 2, te=False)


def test_real_layouts_validate():
    ParallelLayout(tp=1, ep=8, pp=1).validate(gpt_oss_120b(), 8)
    ParallelLayout(tp=2, ep=8, pp=4).validate(gpt_oss_120b(), 32)
    assert ParallelLayout(ep=2, pp=2).owned(tiny(), ep_rank=1, pp_rank=1).first_expert == 4


@pytest.mark.parametrize("fixture", ["tiny_mxfp4", "tiny_bf16"])
def test_ep2_rank_reads_only_its_experts(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    layout, cfg = ParallelLayout(ep=2), tiny()
    full = HFReader(ckpt)
    total = full.expert_bytes_total()
    for ep_rank in range(2):
        reader = HFReader(ckpt)
        own = layout.owned(reader.cfg, ep_rank=ep_rank, pp_rank=0)
        for layer in range(cfg.num_hidden_layers):
            mine = reader.experts(layer, own.first_expert, own.num_experts)
            every = full.experts(layer, 0, cfg.num_local_experts)
            for k, v in mine.items():
                assert torch.equal(v, every[k][own.first_expert:own.first_expert + own.num_experts]), k
        share = reader.expert_bytes_read / total
        print(f"{fixture} EP2 rank {ep_rank}: read {reader.expert_bytes_read} of {total} expert bytes ({share:.1%})")
        assert share <= 0.55


def test_dequantized_experts_equal_transformers(tiny_mxfp4):
    reader = HFReader(tiny_mxfp4)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    ref = convert_moe_packed_tensors(reader.read(name + "_blocks"), reader.read(name + "_scales"))  # [E, H, 2I]
    ours = reader.experts(1, 0, reader.cfg.num_local_experts)["gate_up_proj"]  # [E, 2I, H]
    assert torch.equal(ours.transpose(1, 2), ref)
