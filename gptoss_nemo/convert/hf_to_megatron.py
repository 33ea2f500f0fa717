"""HF gpt-oss -> one rank's megatron parameters: read only the slices the rank owns, transform, load.

`iter_rank_state` is pure (CPU, no process group): given a layout and the rank's (tp, ep, pp) coordinates it
yields exactly the tensors of that rank's megatron model, named as megatron names them, one layer at a time.
`load_rank_state` copies such a stream into a built model, checking names one for one and shapes exactly;
at most one layer is held on the CPU.
"""

from __future__ import annotations

import torch

from gptoss_nemo.checkpoint.hf_layout import layer_prefix
from collections.abc import Iterable, Iterator

from gptoss_nemo.convert.hf_reader import HFReader
from gptoss_nemo.convert.mapping import (
    GLOBAL_TABLE,
    QKV,
    check_names,
    deinterleave_gate_up,
    expert_name,
    megatron_layer_names,
    qkv_fuse,
    tp_rows,
)
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.parallel.layout import ParallelLayout


def iter_rank_state(
    reader: HFReader, layout: ParallelLayout, *, tp_rank: int, ep_rank: int, pp_rank: int, te: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) for every parameter the rank at (tp_rank, ep_rank, pp_rank) holds."""
    cfg, tp = reader.cfg, layout.tp
    own = layout.owned(cfg, ep_rank=ep_rank, pp_rank=pp_rank)
    vocab = tp_rows(cfg.vocab_size, tp_rank, tp)
    if pp_rank == 0:
        yield GLOBAL_TABLE["model.embed_tokens.weight"], reader.read("model.embed_tokens.weight", vocab)
    for local in range(own.num_layers):
        layer = own.first_layer + local
        for suffix, t in layer_state(reader, layout, layer, tp_rank, own.first_expert, own.num_experts, te).items():
            yield f"decoder.layers.{local}.{suffix}", t
    if pp_rank == layout.pp - 1:
        yield GLOBAL_TABLE["model.norm.weight"], reader.read("model.norm.weight")
        yield GLOBAL_TABLE["lm_head.weight"], reader.read("lm_head.weight", vocab)


def layer_state(reader: HFReader, layout: ParallelLayout, layer: int, tp_rank: int, first_expert: int,
                num_experts: int, te: bool) -> dict[str, torch.Tensor]:
    """One layer's megatron tensors (names relative to `decoder.layers.{n}.`) for one TP rank and EP slice."""
    cfg, p = reader.cfg, layer_prefix(layer)
    d, groups = cfg.head_dim, cfg.num_key_value_heads // layout.tp
    heads = tp_rows(cfg.num_attention_heads, tp_rank, layout.tp)
    group_rows = tp_rows(cfg.num_key_value_heads, tp_rank, layout.tp)
    q_rows = slice(heads.start * d, heads.stop * d)
    kv_rows = slice(group_rows.start * d, group_rows.stop * d)
    out: dict[str, torch.Tensor] = {}
    for kind, mc in QKV.items():
        q, k, v = (reader.read(f"{p}self_attn.{x}_proj.{kind}", rows)
                   for x, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)))
        out[mc] = qkv_fuse(cfg, q, k, v, groups=groups)
    split = {"self_attn.o_proj.weight": (slice(None), q_rows), "self_attn.sinks": (heads, None)}
    for hf, mc in megatron_layer_names(te).items():
        rows, cols = split.get(hf, (slice(None), None))
        out[mc] = reader.read(p + hf, rows, cols)
    experts = reader.experts(layer, first_expert, num_experts)
    for e in range(num_experts):
        fc = {
            "linear_fc1.weight": deinterleave_gate_up(experts["gate_up_proj"][e]),
            "linear_fc1.bias": deinterleave_gate_up(experts["gate_up_proj_bias"][e]),
            "linear_fc2.weight": experts["down_proj"][e],
            "linear_fc2.bias": experts["down_proj_bias"][e],
        }
        out.update({"mlp.experts." + expert_name(e, param, te): t.contiguous() for param, t in fc.items()})
    return out


def load_rank_state(model: torch.nn.Module, state: Iterable[tuple[str, torch.Tensor]], where: str = "import") -> None:
    """Copy (name, tensor) pairs into the model's parameters; names must match one for one, shapes exactly."""
    params = dict(unwrap(model).named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for name, t in state:
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"{where}: {name} is not a parameter of this model stage")
            if name in seen:
                raise CheckpointError(f"{where}: {name} was given twice")
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(f"{where}: {name} is {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(param.shape)} in the model")
            param.copy_(t)
            seen.add(name)
    check_names(set(params), seen, where)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
