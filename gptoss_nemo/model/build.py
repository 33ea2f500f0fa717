"""Build the megatron-core `GPTModel` for a gpt-oss config, with the Transformer Engine spec when TE imports.

Needs megatron's parallel state to be initialized (`megatron.core.parallel_state.initialize_model_parallel`)
and a CUDA device: megatron-core creates the sink parameters and the YaRN cache on the GPU.
"""

from __future__ import annotations

import logging

import torch

from gptoss_nemo.compat import apply_megatron_patches
from gptoss_nemo.errors import ConfigError, DeviceError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.megatron_config import GptOssTransformerConfig, RouterConfig, to_transformer_config

log = logging.getLogger(__name__)
MIN_TE_FOR_SINKS = "2.8"  # fused attention with learnable softmax offsets (sinks)


def te_version() -> str | None:
    """The importable Transformer Engine version, or None."""
    try:
        import transformer_engine  # noqa: F401
        from importlib.metadata import version

        return version("transformer_engine")
    except Exception:  # ImportError, or a TE whose CUDA libraries do not load
        return None


def resolve_use_te(use_te: bool | None) -> bool:
    """None: TE when it imports. True without TE is an error, not a silent fallback."""
    te = te_version()
    if use_te and te is None:
        raise ConfigError("Transformer Engine was asked for but transformer_engine does not import; use the NeMo "
                          "container, or megatron's local spec (--local-spec)")
    return te is not None if use_te is None else use_te


def layer_spec(config: GptOssTransformerConfig, use_te: bool):
    """Decoder layer spec: TE (grouped-GEMM experts, fused attention) or megatron's local spec, whose attention and
    experts are megatron's reference modules (kernels="reference") or the fused ones (kernels="fused")."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization=config.normalization
    )
    return fused_local_spec(spec) if config.local_kernels == "fused" else spec


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


def transformer_config(
    hf: GptOssConfig, router: RouterConfig | None = None, *, use_te: bool | None = None, **overrides
) -> GptOssTransformerConfig:
    """`to_transformer_config` with the attention backend chosen for the installed Transformer Engine."""
    use_te = resolve_use_te(use_te)
    if use_te:
        te = te_version()
        from megatron.core.transformer.enums import AttnBackend
        from packaging.version import Version

        if Version(te) < Version(MIN_TE_FOR_SINKS):
            log.warning("Transformer Engine %s < %s has no fused sink attention: using local attention", te,
                        MIN_TE_FOR_SINKS)
            overrides.setdefault("attention_backend", AttnBackend.local)
    return to_transformer_config(hf, router, use_te=use_te, **overrides)


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
    if config.local_kernels == "fused" and config.moe_grouped_gemm:
        raise ConfigError("kernels=fused is the fast path of megatron's local spec; with Transformer Engine the TE "
                          "spec's own fused kernels run (use --local-spec to choose the local spec)")
    # to_transformer_config turns grouped-GEMM experts on exactly when it is given the TE spec.
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te=bool(config.moe_grouped_gemm)),
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
    if post_process:
        from gptoss_nemo.model import cross_entropy

        cross_entropy.use_for(model)  # the fused kernels' BF16-reading loss (TP 1)
    return model.cuda(torch.cuda.current_device())  # the local spec creates norms on the CPU


def build_rank_model(hf: GptOssConfig, layout, router: RouterConfig | None = None, *, use_te: bool | None = None,
                     parallel_output: bool = True, **overrides):
    """This rank's stage of the model under `layout`, after `parallel.setup.init_distributed(layout)`."""
    from megatron.core import parallel_state as ps

    use_te = resolve_use_te(use_te)
    if use_te and overrides.get("local_kernels") == "fused":
        log.info("Transformer Engine spec: its fused attention and grouped GEMM run; kernels=fused is for the local spec")
        overrides["local_kernels"] = "reference"
    config = transformer_config(hf, router, use_te=use_te, **{**layout.megatron_overrides(use_te), **overrides})
    return build_model(hf, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                       parallel_output=parallel_output)
