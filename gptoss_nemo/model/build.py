"""Build the megatron-core `GPTModel` for a gpt-oss config under one of its implementations (model/impl.py).

Needs megatron's parallel state to be initialized (`megatron.core.parallel_state.initialize_model_parallel`)
and a CUDA device: megatron-core creates the sink parameters and the YaRN cache on the GPU.
"""

from __future__ import annotations

import torch

from gptoss_nemo.compat import apply_megatron_patches, moe_local_spec_checkpoint_keys
from gptoss_nemo.errors import DeviceError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.impl import ModelImpl, resolve_impl
from gptoss_nemo.model.megatron_config import GptOssTransformerConfig, RouterConfig, to_transformer_config


def layer_spec(config: GptOssTransformerConfig):
    """Decoder layer spec for `config.impl` (model/impl.py): TE's (grouped-GEMM experts, fused attention), or
    megatron's local spec with megatron's reference modules ("reference") or the fused ones ("fused")."""
    if config.impl == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = moe_local_spec_checkpoint_keys(get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization=config.normalization
    ))
    return fused_local_spec(spec) if config.impl == "fused" else spec


def fused_local_spec(spec):
    """The local spec with flex attention (sinks, window, documents) and grouped-GEMM experts swapped in: the
    same parameters and checkpoint keys as the reference modules they replace."""
    import dataclasses
    import functools

    from gptoss_nemo.model.flex_attention import FlexSinkAttention
    from gptoss_nemo.model.grouped_experts import GroupedGemmExperts

    spec.submodules.self_attention.submodules.core_attention = FlexSinkAttention
    mlp = spec.submodules.mlp
    moe = mlp.keywords["submodules"]
    experts = functools.partial(GroupedGemmExperts, *moe.experts.args, **moe.experts.keywords)
    spec.submodules.mlp = functools.partial(mlp.func, *mlp.args,
                                            **{**mlp.keywords, "submodules": dataclasses.replace(moe, experts=experts)})
    return spec


def transformer_config(hf: GptOssConfig, router: RouterConfig | None = None, impl: str | ModelImpl = "auto",
                       **overrides) -> GptOssTransformerConfig:
    """`to_transformer_config` for a (resolved or requested) implementation."""
    return to_transformer_config(hf, router, impl=resolve_impl(impl).name, **overrides)


def build_model(
    hf: GptOssConfig,
    config: GptOssTransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    parallel_output: bool = True,
):
    """The GPTModel for this pipeline stage (pre/post_process say whether it holds embedding / output layer).
    parallel_output=False gathers the vocabulary-parallel logits (for evaluation, not for training)."""
    from megatron.core.models.gpt import GPTModel

    apply_megatron_patches()
    if not torch.cuda.is_available():
        raise DeviceError("building the megatron gpt-oss model needs a CUDA GPU (megatron-core allocates on it)")
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=hf.vocab_size,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="yarn",
        rotary_base=int(hf.rope.theta),
        vp_stage=vp_stage,
        parallel_output=parallel_output,
    )
    if config.context_parallel_size > 1:
        from gptoss_nemo.compat import scale_sink_gradients_over_cp

        scale_sink_gradients_over_cp(model, config.context_parallel_size)
    if post_process:
        from gptoss_nemo.model import cross_entropy

        cross_entropy.use_for(model)  # the fused kernels' BF16-reading loss (TP 1)
    return model.cuda(torch.cuda.current_device())  # the local spec creates norms on the CPU


def build_rank_model(hf: GptOssConfig, layout, router: RouterConfig | None = None, *,
                     impl: str | ModelImpl = "auto", parallel_output: bool = True, **overrides):
    """This rank's stage of the model under `layout`, after `parallel.setup.init_distributed(layout)`."""
    from megatron.core import parallel_state as ps

    impl = resolve_impl(impl, layout=layout)
    config = transformer_config(hf, router, impl, **{**layout.megatron_overrides(impl.te), **overrides})
    return build_model(hf, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                       parallel_output=parallel_output)
