"""config.json -> GptOssConfig -> megatron TransformerConfig, and parameter counts against the published sizes."""

import pytest
import torch

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.megatron_config import RouterConfig, to_transformer_config
from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.model.presets import gpt_oss_20b, gpt_oss_120b, preset, tiny

# Published: gpt-oss model card (total / active parameters, billions).
PUBLISHED = {"gpt-oss-20b": (20.9e9, 3.6e9), "gpt-oss-120b": (116.8e9, 5.1e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    count = count_parameters(preset(name))
    total, active = PUBLISHED[name]
    assert abs(count.total - total) / total < 0.01, count
    assert abs(count.active - active) / active < 0.01, count


@pytest.mark.parametrize("make", [gpt_oss_20b, gpt_oss_120b, tiny])
def test_parameter_count_equals_transformers_model(make):
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    cfg = make()
    with torch.device("meta"):
        model = GptOssForCausalLM(HFConfig(**cfg.to_dict()))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total


def test_20b_transformer_config():
    tc = to_transformer_config(gpt_oss_20b())
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (
        24, 2880, 64, 8, 64)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (32, 4, 2880)
    assert tc.softmax_type == "learnable" and tc.normalization == "RMSNorm"
    assert tc.add_bias_linear and tc.add_qkv_bias and tc.gated_linear_unit
    assert tc.activation_func_clamp_value == 7.0 and tc.glu_linear_offset == 1.0
    assert tc.activation_func(torch.tensor([1.0])).item() == pytest.approx(torch.sigmoid(torch.tensor(1.702)).item())
    # transformers' window 128 lets a query see itself and 127 earlier keys: megatron (127, 0).
    assert tc.window_size == (127, 0)
    assert tc.window_attn_skip_freq == [1, 0] * 12  # layer 0 slides, layer 1 is full, ...
    assert tc.moe_router_dtype == "fp32" and not tc.moe_router_pre_softmax
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff > 0
    assert tc.yarn_rotary_scaling_factor == 32.0 and tc.yarn_original_max_position_embeddings == 4096
    assert (tc.yarn_beta_fast, tc.yarn_beta_slow) == (32.0, 1.0)
    assert tc.yarn_mscale is None and not tc.yarn_correction_range_round_to_int and not tc.apply_rope_fusion
    assert tc.params_dtype == torch.bfloat16 and tc.bf16


def test_120b_transformer_config_and_layer_types_follow_config():
    cfg = gpt_oss_120b()
    assert to_transformer_config(cfg).num_moe_experts == 128
    odd = cfg.replace(layer_types=["full_attention"] * 35 + ["sliding_attention"])
    assert to_transformer_config(odd).window_attn_skip_freq == [0] * 35 + [1]


def test_router_config_choices():
    tc = to_transformer_config(tiny(), RouterConfig(load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01,
                                                    z_loss_coeff=1e-3))
    assert (tc.moe_router_load_balancing_type, tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff) == (
        "seq_aux_loss", 0.01, 1e-3)
    with pytest.raises(ConfigError, match="load_balancing_type='none'"):
        RouterConfig(load_balancing_type="none")
    for coeff in (0.0, -1.0):
        with pytest.raises(ConfigError, match="aux_loss_coeff"):
            RouterConfig(aux_loss_coeff=coeff)


def test_router_dtype_for_training_and_for_like_for_like_verification():
    """Training routes in FP32; verify-export --router-dtype bf16 routes in the input's dtype, as transformers."""
    from gptoss_nemo.cli import build_parser
    from gptoss_nemo.evaluate.verify_export import ROUTER_DTYPES

    assert to_transformer_config(tiny()).moe_router_dtype == "fp32"
    args = build_parser().parse_args(["verify-export", "out", "--against", "ckpt", "--router-dtype", "bf16"])
    assert to_transformer_config(tiny(), moe_router_dtype=ROUTER_DTYPES[args.router_dtype]).moe_router_dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["verify-export", "out", "--against", "ckpt", "--router-dtype", "fp16"])


def test_bf16_router_routes_exactly_as_transformers():
    """megatron's routing functions with the router in BF16 (verify-export --router-dtype bf16) choose the same
    experts with the same weights as transformers' GptOssTopKRouter, bit for bit; the FP32 router (training) picks
    another expert set for some near-tied tokens."""
    import torch
    from megatron.core.transformer.moe.moe_utils import router_gating_linear, topk_routing_with_score_function
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    gen = torch.Generator().manual_seed(0)
    router = GptOssTopKRouter(HFConfig(hidden_size=128, num_local_experts=32, num_experts_per_tok=4))
    with torch.no_grad():
        router.weight.copy_(torch.randn(32, 128, generator=gen) * 0.02)
        router.bias.copy_(torch.randn(32, generator=gen) * 0.01)
    router = router.bfloat16()
    hidden = torch.randn(8192, 128, generator=gen).bfloat16()

    def dense(probs, idx):  # [tokens, experts] routing weights
        return torch.zeros(idx.shape[0], 32).scatter(1, idx, probs.float())

    with torch.no_grad():
        _, probs, idx = router(hidden)
        reference = dense(probs, idx)
        ours = {dtype: dense(*topk_routing_with_score_function(
            router_gating_linear(hidden, router.weight, router.bias, dtype), 4, dense_output=True))
            for dtype in (torch.bfloat16, torch.float32)}
    assert torch.equal(ours[torch.bfloat16], reference)
    other_experts = ((ours[torch.float32] > 0) != (reference > 0)).any(1).float().mean().item()
    assert 0 < other_experts < 0.05, other_experts


def test_openai_config_json_round_trips():
    raw = gpt_oss_20b().to_dict()
    assert raw["rope_scaling"]["rope_type"] == "yarn" and raw["quantization_config"]["quant_method"] == "mxfp4"
    assert GptOssConfig.from_dict(raw) == gpt_oss_20b()
    # transformers v5 writes rope_parameters instead of rope_scaling/rope_theta
    v5 = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**raw["rope_scaling"], "rope_theta": raw["rope_theta"]}
    assert GptOssConfig.from_dict(v5) == gpt_oss_20b()


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type"),
        ({"hidden_size": 2000}, "hidden_size"),
        ({"intermediate_size": 100}, "intermediate_size"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"num_experts_per_tok": 64}, "num_experts_per_tok"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quant_method"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"swiglu_alpha": 1.0}, "swiglu_alpha"),
    ],
)
def test_bad_config_names_the_field(change, field):
    raw = {**gpt_oss_20b().to_dict(), **change}
    with pytest.raises(ConfigError, match=field) as info:
        to_transformer_config(GptOssConfig.from_dict(raw))
    assert "\n" not in str(info.value)


def test_missing_field_is_named():
    raw = gpt_oss_20b().to_dict()
    del raw["num_local_experts"]
    with pytest.raises(ConfigError, match="missing field.*num_local_experts"):
        GptOssConfig.from_dict(raw)
