"""Checkpoints independent of the implementation (issue 21; convert/checkpoint_keys.py, compat.py 6, 8, 9) on the
CPU: the load request matched to what a checkpoint holds (aliases both ways, TE's extra states, amax shapes); whole
tiny models saved under one local implementation and loaded under the other, including checkpoints written with the
old pre-MLP norm key and quantized ones (checkpoint_keys_worker.py); ModelOpt's expert quantizers restored across
SequentialMLP and TE's grouped experts. Transformer Engine itself is exercised by the GPU tier
(tests/gpu/test_impl_gpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("checkpoint_keys_worker.py")


def _sharded(key: str, shape: tuple, prepend: int = 1):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, torch.zeros(shape), *[(0, 2, 4)][:prepend], prepend_axis_num=prepend) \
        if prepend else ShardedTensor.from_rank_offsets(key, torch.zeros(shape))


def _object(key: str):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, None, (4,), (2,))


def test_request_matched_to_a_checkpoint_of_the_other_implementation():
    from gptoss_nemo.convert.checkpoint_keys import match_checkpoint

    written = {  # what a checkpoint of the old local spec holds (metadata: no data)
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": _sharded("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                                                                   (8,)),
        "decoder.layers.self_attention.linear_qkv.weight": _sharded("decoder.layers.self_attention.linear_qkv.weight",
                                                                   (3, 8)),
        "decoder.layers.0.mlp.experts.experts.1.linear_fc1.weight_quantizer._amax": _sharded(
            "decoder.layers.0.mlp.experts.experts.1.linear_fc1.weight_quantizer._amax", (1,), 0),
    }
    request = {  # what TE's model asks for
        "decoder.layers.2.pre_mlp_layernorm.weight": _sharded("decoder.layers.pre_mlp_layernorm.weight", (8,)),
        "decoder.layers.2.pre_mlp_layernorm._extra_state": _object("decoder.layers.pre_mlp_layernorm._extra_state"),
        "decoder.layers.2.self_attention.linear_qkv.weight": _sharded("decoder.layers.self_attention.linear_qkv.weight",
                                                                     (3, 8)),
        "decoder.layers.0.mlp.experts.linear_fc1.weight_quantizer.1._amax": _sharded(
            "decoder.layers.0.mlp.experts.experts.1.linear_fc1.weight_quantizer._amax", (), 0),
        "decoder.layers.2.self_attention.linear_proj.bias": _sharded("decoder.layers.self_attention.linear_proj.bias",
                                                                    (8,)),
    }
    entries = {sh.key: sh for sh in written.values()}
    m = match_checkpoint(request, entries)
    assert request["decoder.layers.2.pre_mlp_layernorm.weight"].key == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert m.left_out == {"decoder.layers.2.pre_mlp_layernorm._extra_state"}
    assert "decoder.layers.2.pre_mlp_layernorm._extra_state" not in request
    amax = "decoder.layers.0.mlp.experts.linear_fc1.weight_quantizer.1._amax"
    assert request[amax].local_shape == (1,) and m.reshaped == {amax: ()}
    assert m.restore_shapes({amax: torch.ones(1)})[amax].shape == ()
    # what the checkpoint does not have at all stays requested: megatron's loader names it
    assert request["decoder.layers.2.self_attention.linear_proj.bias"].key.endswith("linear_proj.bias")
    # and the other way round: the new name found where the old one is asked for
    back = {"x": _sharded("decoder.layers.mlp.linear_fc1.layer_norm_weight", (8,))}
    new = "decoder.layers.pre_mlp_layernorm.weight"
    match_checkpoint(back, {new: _sharded(new, (8,))})
    assert back["x"].key == "decoder.layers.pre_mlp_layernorm.weight"


@pytest.mark.parametrize("src,dst,flags,port", [
    ("reference", "fused", ["--old-keys"], "29611"),
    ("fused", "reference", [], "29612"),
    ("fused", "reference", ["--quant", "nvfp4"], "29613"),
])
def test_whole_model_checkpoints_load_across_local_implementations(src, dst, flags, port, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(WORKER), src, dst, str(tmp_path / "ckpt"), port, *flags],
                       capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["same_names"] and got["equal"] == got["params"] > 100, got
    assert got["quantizers_equal"] and got["quantizers"] == (64 if flags[:1] == ["--quant"] else 0), got
    assert got["meta"]["impl"] == src


def test_local_spec_writes_te_key_for_the_moe_norm(monkeypatch):
    from gptoss_nemo.model.build import layer_spec
    from gptoss_nemo.model.megatron_config import to_transformer_config
    from gptoss_nemo.model.presets import tiny

    keys = layer_spec(to_transformer_config(tiny(), impl="fused")).submodules.sharded_state_dict_keys_map
    assert "pre_mlp_layernorm." not in keys and keys["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    monkeypatch.setenv("GPTOSS_NEMO_SKIP_PATCHES", "moe_local_checkpoint_keys")
    keys = layer_spec(to_transformer_config(tiny(), impl="fused")).submodules.sharded_state_dict_keys_map
    assert keys["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"  # megatron's own, still there to fix


def _quantizer(bits=(2, 1), amax: float | None = None):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=bits, block_sizes={-1: 16, "type": "dynamic",
                                                                             "scale_bits": (4, 3)}))
    if amax is not None:
        q.amax = torch.tensor(amax)
    return q


class _Linear(torch.nn.Module):
    """What ModelOpt's extra-state callbacks see of a quantized expert linear (SequentialMLP's, or TE's grouped)."""

    def __init__(self, weight_quantizer):
        super().__init__()
        self.weight_quantizer = weight_quantizer
        self.allow_post_restore = True

    def modelopt_post_restore(self, prefix: str = ""):
        pass


@pytest.mark.parametrize("direction", ["local_to_te", "te_to_local"])
def test_expert_quantizer_state_restores_across_implementations(direction):
    """compat.py 8: each side's expert weight quantizers take the other side's configuration."""
    from modelopt.torch.quantization.nn import GroupedQuantizer
    from modelopt.torch.quantization.plugins import megatron as mo

    from gptoss_nemo.compat import apply_modelopt_patches

    assert "modelopt_expert_quantizer_names" in apply_modelopt_patches()
    saved_q = _quantizer(amax=3.0)
    if direction == "local_to_te":
        state = {"weight_quantizer": saved_q.get_modelopt_state()}
        target = _Linear(GroupedQuantizer(*(_quantizer((4, 3)) for _ in range(3))))
    else:
        state = {f"weight_quantizer.{i}": saved_q.get_modelopt_state() for i in range(3)}
        target = _Linear(_quantizer((4, 3)))
    mo.quant_module_set_extra_state(target, {"modelopt_quantizer_state": state})
    members = list(target.weight_quantizer) if direction == "local_to_te" else [target.weight_quantizer]
    assert all(m.num_bits == (2, 1) and m.block_sizes["scale_bits"] == (4, 3) for m in members)
    assert all(getattr(m, "_amax", None) is not None for m in members)  # the buffer the checkpoint then fills


def test_grouped_expert_amax_restored_for_every_expert():
    """compat.py 9: after ModelOpt's restore only expert 0 of a GroupedQuantizer kept an amax."""
    from modelopt.torch.quantization.nn import GroupedQuantizer

    from gptoss_nemo.compat import grouped_amax_buffers

    model = _Linear(GroupedQuantizer(_quantizer(amax=2.0), _quantizer(), _quantizer()))
    assert grouped_amax_buffers(model) == 2
    assert [float(q.amax) for q in model.weight_quantizer] == [2.0, 2.0, 2.0]
    assert grouped_amax_buffers(model) == 0


def test_grouped_expert_weight_scales_shared_per_projection():
    """NVFP4 under TE: every grouped expert of a layer projection takes the projection's maximum amax."""
    from modelopt.torch.quantization.nn import GroupedQuantizer

    from gptoss_nemo.quantize.modelopt_state import expert_weight_quantizers, share_grouped_expert_amax

    gpt = torch.nn.Module()
    gpt.decoder = torch.nn.Module()
    gpt.decoder.layers = torch.nn.ModuleList([torch.nn.Module()])
    gpt.decoder.layers[0].mlp = torch.nn.Module()
    gpt.decoder.layers[0].mlp.experts = torch.nn.Module()
    experts = gpt.decoder.layers[0].mlp.experts
    experts.linear_fc1 = _Linear(GroupedQuantizer(*(_quantizer(amax=a) for a in (1.0, 4.0, 2.5))))
    experts.linear_fc2 = _Linear(GroupedQuantizer(*(_quantizer(amax=a) for a in (3.0, 0.5, 1.0))))
    assert len(list(expert_weight_quantizers(gpt))) == 2
    assert share_grouped_expert_amax(gpt) == 6
    assert [float(q.amax) for q in experts.linear_fc1.weight_quantizer] == [4.0] * 3
    assert [float(q.amax) for q in experts.linear_fc2.weight_quantizer] == [3.0] * 3
