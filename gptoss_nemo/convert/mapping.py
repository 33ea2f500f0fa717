"""HF gpt-oss <-> megatron-core parameter names and layouts: one table, a few named transforms.

Megatron names are those of one pipeline stage's model: `decoder.layers.{n}` counts the stage's own layers and
`local_experts.{e}` (local spec, SequentialMLP) or `linear_fc1.weight{e}` (TE spec, grouped GEMM) the rank's own
experts; `LayerIndex` carries the offsets back to global HF indices.

Transforms (HF layout -> megatron layout; each has an exact inverse; `TP_SPLIT_DIM` says how TP shards):
  qkv_fuse     q [heads*d, H], k/v [groups*d, H] -> [groups*(heads/groups + 2)*d, H]: per query group, its query
               heads, then its key head, then its value head (megatron's fused GQA layout; TP splits groups).
               The same for the biases.
  gate_up      HF interleaves gate and up rows (row 2j = gate j, row 2j+1 = up j); megatron's GLU takes
               the first half as gate and the second as up: de-interleave to [gate; up].
  expert_in    BF16 HF experts are input-major ([H, 2I] and [I, H] per expert); megatron holds [out, in]:
               transpose. MXFP4 blocks dequantize straight to [out, in] (see checkpoint/mxfp4.py).
  sinks        `self_attn.sinks` is megatron's learnable `core_attention.softmax_offset`, one logit per head.
"""

from __future__ import annotations

import torch

from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.parallel.layout import LayerIndex

# HF suffix under model.layers.{n}. -> megatron suffix under decoder.layers.{n}., for the local spec.
LAYER_TABLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.o_proj.bias": "self_attention.linear_proj.bias",
    "self_attn.sinks": "self_attention.core_attention.softmax_offset",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.router.bias": "mlp.router.bias",
}
QKV = {"weight": "self_attention.linear_qkv.weight", "bias": "self_attention.linear_qkv.bias"}
# TE fuses the input norm into linear_qkv.
TE_RENAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight"}
GLOBAL_TABLE = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
EXPERT_PARAMS = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")
# Megatron suffix -> the dim tensor parallelism splits (column-parallel: 0, row-parallel: 1); absent = every TP
# rank holds the whole tensor. Experts are absent too: ETP = 1.
TP_SPLIT_DIM = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "self_attention.core_attention.softmax_offset": 0,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
}


def expert_name(local_expert: int, param: str, te: bool) -> str:
    """Megatron name (under decoder.layers.{n}.mlp.experts.) of one local expert's parameter."""
    if te:
        return f"{param}{local_expert}"
    return f"local_experts.{local_expert}.{param}"


def megatron_layer_names(te: bool) -> dict[str, str]:
    """HF layer suffix -> megatron layer suffix for the non-expert, non-QKV tensors."""
    return {hf: TE_RENAMES.get(hf, mc) if te else mc for hf, mc in LAYER_TABLE.items()}


# ---- transforms --------------------------------------------------------------------------------------------


def qkv_fuse(cfg: GptOssConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             groups: int | None = None) -> torch.Tensor:
    """q/k/v rows of `groups` consecutive query groups (all of them by default) -> megatron's fused rows."""
    groups = cfg.num_key_value_heads if groups is None else groups
    d, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *rest)


def qkv_split(cfg: GptOssConfig, fused: torch.Tensor, groups: int | None = None):
    """Inverse of qkv_fuse; `groups` < num_key_value_heads splits a tensor-parallel shard."""
    groups = cfg.num_key_value_heads if groups is None else groups
    d, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    rest = fused.shape[1:]
    g = fused.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(g, [per_group * d, d, d], dim=1)
    return q.reshape(groups * per_group * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def deinterleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """HF rows [g0, u0, g1, u1, ...] -> megatron rows [g0, g1, ..., u0, u1, ...] (dim 0 of one expert)."""
    return torch.cat([t[0::2], t[1::2]], dim=0)


def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(t, 2, dim=0)
    return torch.stack([gate, up], dim=1).reshape(t.shape)


def tp_rows(total: int, tp_rank: int, tp: int) -> slice:
    """The contiguous block of `total` rows (heads, groups, vocabulary entries) TP rank `tp_rank` holds."""
    n = total // tp
    return slice(tp_rank * n, (tp_rank + 1) * n)


def layer_suffixes(num_local_experts: int, te: bool) -> list[str]:
    """Megatron names of one layer's parameters, relative to `decoder.layers.{n}.`, in a fixed order."""
    index = LayerIndex(first_layer=0, num_layers=1, first_expert=0, num_experts=num_local_experts)
    prefix = "decoder.layers.0."
    return sorted(n[len(prefix):] for n in megatron_param_names(index, te, False, False))


def check_names(expected: set[str], got: set[str], where: str) -> None:
    """Every expected name present, no unknown one: raise naming the first difference (no silent skips)."""
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing:
        raise CheckpointError(f"{where}: no mapping filled {missing[0]} ({len(missing)} missing in all)")
    if extra:
        raise CheckpointError(f"{where}: {extra[0]} has no gpt-oss mapping ({len(extra)} unknown in all)")


def megatron_param_names(index: LayerIndex, te: bool, pre_process: bool, post_process: bool) -> set[str]:
    """Every parameter name a stage's megatron model has (what a loader must fill, no more)."""
    names: set[str] = set()
    for n in range(index.num_layers):
        p = f"decoder.layers.{n}."
        names.update(p + mc for mc in megatron_layer_names(te).values())
        names.update(p + qkv for qkv in QKV.values())
        names.update(p + "mlp.experts." + expert_name(e, param, te)
                     for e in range(index.num_experts) for param in EXPERT_PARAMS)
    if pre_process:
        names.add(GLOBAL_TABLE["model.embed_tokens.weight"])
    if post_process:
        names.add(GLOBAL_TABLE["model.norm.weight"])
        names.add(GLOBAL_TABLE["lm_head.weight"])
    return names
