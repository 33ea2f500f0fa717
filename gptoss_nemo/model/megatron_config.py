"""gpt-oss config.json -> megatron-core `TransformerConfig`.

Each gpt-oss feature and the megatron-core field that carries it:
  attention   GQA (`num_query_groups`), head dim (`kv_channels`), biases on q/k/v/o (`add_qkv_bias`,
              `add_bias_linear`), learnable per-head sinks (`softmax_type="learnable"`: the sink logit joins
              the softmax denominator; stored as `core_attention.softmax_offset`).
  window      transformers lets query i see keys i-127..i for `sliding_window=128`; megatron's
              `window_size=(w, 0)` lets it see i-w..i, so w = sliding_window - 1 (the off-by-one).
              Which layers slide comes from config.json `layer_types` as the list form of
              `window_attn_skip_freq` (1 = sliding), so no parity assumption is needed.
  rope        YaRN with factor/theta/original positions/betas from config.json; `truncate: false` ->
              `yarn_correction_range_round_to_int=False`; mscale left unset so the attention factor is
              0.1 ln(factor) + 1, as in transformers. RoPE fusion is off: TE's fused RoPE has no mscale.
  experts     clamped SwiGLU: gate clamped above at `swiglu_limit`, up clamped to +-limit, out =
              gate * sigmoid(1.702 gate) * (up + 1): `activation_func=quick_gelu`,
              `activation_func_clamp_value`, `glu_linear_offset=1.0`; biases on fc1/fc2.
  router      linear with bias, top-k then softmax over the k logits (`moe_router_pre_softmax=False`),
              computed in fp32 (`moe_router_dtype="fp32"`), load-balancing loss from `RouterConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.impl import IMPLS

BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


@dataclass(kw_only=True)
class GptOssTransformerConfig(TransformerConfig):
    """TransformerConfig plus the YaRN fields GPTModel and attention read through getattr."""

    yarn_rotary_scaling_factor: float = 32.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    yarn_correction_range_round_to_int: bool = False
    impl: Literal["fused", "te", "reference"] = "reference"
    """Which implementation builds the layers (model/impl.py): megatron's local spec with the fused kernels
    (flex attention with sinks, grouped-GEMM experts) or with megatron's reference modules, or TE's spec."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.impl not in IMPLS:
            raise ConfigError(f"impl={self.impl!r}; allowed: {', '.join(IMPLS)}")
        if self.moe_grouped_gemm != (self.impl == "te"):
            raise ConfigError(f"impl={self.impl} with moe_grouped_gemm={self.moe_grouped_gemm}: TE's spec runs "
                              "grouped-GEMM experts, the local spec its own (model/build.py)")


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    """How the router is trained. The load-balancing loss is always on: megatron-core skips the loss and its
    logging entirely at coefficient 0, which is how experts collapse unnoticed, so 0 and "none" are refused."""

    load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss"] = "aux_loss"
    """aux_loss: per micro-batch (Switch/GShard); seq_aux_loss: per sequence; global_aux_loss: per global batch."""
    aux_loss_coeff: float = 1e-3
    z_loss_coeff: float | None = None
    """Router z-loss (ST-MoE); None disables it."""

    def __post_init__(self) -> None:
        if self.load_balancing_type not in BALANCING_TYPES:
            raise ConfigError(
                f"router.load_balancing_type={self.load_balancing_type!r}; allowed: {', '.join(BALANCING_TYPES)} "
                "(gptoss-nemo keeps the load-balancing loss on; lower router.aux_loss_coeff to weaken it)"
            )
        if not self.aux_loss_coeff > 0:
            raise ConfigError(
                f"router.aux_loss_coeff={self.aux_loss_coeff} must be > 0: at 0 megatron-core drops the balancing "
                "loss and its per-layer logging (typical values 1e-3 to 1e-2)"
            )
        if self.z_loss_coeff is not None and not self.z_loss_coeff >= 0:
            raise ConfigError(f"router.z_loss_coeff={self.z_loss_coeff} must be >= 0 or null")


def to_transformer_config(
    hf: GptOssConfig,
    router: RouterConfig | None = None,
    *,
    impl: str = "reference",
    params_dtype: torch.dtype = torch.bfloat16,
    **overrides,
) -> GptOssTransformerConfig:
    """Megatron config for `hf`. `overrides` set parallelism and other TransformerConfig fields."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    router = router or RouterConfig()
    if abs(hf.swiglu_alpha - 1.702) > 1e-9:
        raise ConfigError(f"config.json: swiglu_alpha={hf.swiglu_alpha}; gpt-oss (and megatron's quick_gelu) use 1.702")
    fields = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        ffn_hidden_size=hf.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        softmax_type="learnable",
        window_size=(hf.sliding_window - 1, 0),
        window_attn_skip_freq=[int(s) for s in hf.sliding_layers],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gated_linear_unit=True,
        activation_func=quick_gelu,
        activation_func_clamp_value=hf.swiglu_limit,
        glu_linear_offset=1.0,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        rotary_interleaved=False,
        yarn_rotary_scaling_factor=hf.rope.factor,
        yarn_original_max_position_embeddings=hf.rope.original_max_position_embeddings,
        yarn_beta_fast=hf.rope.beta_fast,
        yarn_beta_slow=hf.rope.beta_slow,
        yarn_correction_range_round_to_int=hf.rope.truncate,
        num_moe_experts=hf.num_local_experts,
        moe_ffn_hidden_size=hf.intermediate_size,
        moe_router_topk=hf.num_experts_per_tok,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type=router.load_balancing_type,
        moe_aux_loss_coeff=router.aux_loss_coeff,
        moe_z_loss_coeff=router.z_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        impl=impl,
        moe_grouped_gemm=impl == "te",
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # what pipeline stages send each other
        init_method_std=hf.initializer_range,
    )
    fields.update(overrides)
    return GptOssTransformerConfig(**fields)
