"""Megatron gpt-oss (any TP x EP x PP layout) -> Hugging Face BF16 tensors, gathered one layer at a time.

Two halves:
  * `layer_to_hf` / `embedding_to_hf` / `final_to_hf` are pure: given the pieces of one layer as each TP rank
    (dense tensors) and each EP rank (experts) holds them, they return the HF tensors, with gate/up
    re-interleaved, experts input-major, QKV split back into q/k/v. Replicated tensors must agree.
  * `gather_hf_tensors` moves the pieces: for each layer in order the owning stage's ranks send theirs to
    global rank 0 (one source per (pp, tp) for dense, per (pp, ep) for experts: data-parallel replicas stay
    quiet), which converts and yields (name, tensor) on the CPU. Every rank must iterate it; only rank 0
    gets tensors. Peak memory on rank 0 is one layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptoss_nemo.checkpoint.hf_layout import layer_prefix, layer_tensors
from gptoss_nemo.convert.mapping import (
    GLOBAL_TABLE,
    QKV,
    TP_SPLIT_DIM,
    expert_name,
    interleave_gate_up,
    layer_suffixes,
    megatron_layer_names,
    qkv_split,
)
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.parallel.setup import RankCoords

Pieces = list[dict[str, torch.Tensor]]


def merge_tp(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Join one tensor's TP shards; a tensor TP does not split must be the same on every TP rank."""
    dim = TP_SPLIT_DIM.get(name)
    if dim is not None:
        return torch.cat(pieces, dim=dim)
    for k, p in enumerate(pieces[1:], start=1):
        if not torch.equal(p, pieces[0]):
            raise CheckpointError(f"{name} differs between tensor-parallel ranks 0 and {k}; its replicas diverged")
    return pieces[0]


def _merged(dense: Pieces) -> dict[str, torch.Tensor]:
    return {name: merge_tp(name, [d[name] for d in dense]) for name in dense[0]}


def embedding_to_hf(dense: Pieces) -> dict[str, torch.Tensor]:
    m = _merged(dense)
    return {"model.embed_tokens.weight": _bf16(m[GLOBAL_TABLE["model.embed_tokens.weight"]])}


def final_to_hf(dense: Pieces) -> dict[str, torch.Tensor]:
    m = _merged(dense)
    return {hf: _bf16(m[GLOBAL_TABLE[hf]]) for hf in ("model.norm.weight", "lm_head.weight")}


def layer_to_hf(cfg: GptOssConfig, layer: int, dense: Pieces, experts: Pieces, te: bool) -> dict[str, torch.Tensor]:
    """HF tensors of global layer `layer`; pieces are keyed by megatron suffix (relative to decoder.layers.{n}.)."""
    m, p = _merged(dense), layer_prefix(layer)
    out: dict[str, torch.Tensor] = {}
    for kind, mc in QKV.items():
        q, k, v = qkv_split(cfg, m[mc])
        out.update({f"{p}self_attn.{x}_proj.{kind}": t for x, t in (("q", q), ("k", k), ("v", v))})
    out.update({p + hf: m[mc] for hf, mc in megatron_layer_names(te).items()})
    per_rank = cfg.num_local_experts // len(experts)

    def stacked(param: str, fn) -> torch.Tensor:
        return torch.stack([fn(ex["mlp.experts." + expert_name(e, param, te)]) for ex in experts
                            for e in range(per_rank)])

    x = p + "mlp.experts."
    out[x + "gate_up_proj"] = stacked("linear_fc1.weight", lambda w: interleave_gate_up(w).t())
    out[x + "gate_up_proj_bias"] = stacked("linear_fc1.bias", interleave_gate_up)
    out[x + "down_proj"] = stacked("linear_fc2.weight", lambda w: w.t())
    out[x + "down_proj_bias"] = stacked("linear_fc2.bias", lambda b: b)
    # The HF table fixes order and completeness: a tensor the mapping did not produce is a KeyError here.
    return {name: _bf16(out[name]) for name in layer_tensors(cfg, layer, quantized=False)}


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous()


# ---- moving the pieces ---------------------------------------------------------------------------------------

_DTYPES = [torch.bfloat16, torch.float32, torch.float16]
_HEADER = 8


def _send(t: torch.Tensor, dst: int, device: torch.device) -> None:
    import torch.distributed as dist

    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
    header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dst)
    dist.send(t.detach().to(device).contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src)
    ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
    t = torch.empty(header[2:2 + ndim].tolist(), dtype=dtype, device=device)
    dist.recv(t, src)
    return t.cpu()


def fetch_to_rank0(me: int, src: int, local: dict[str, torch.Tensor], names: list[str], device) -> dict | None:
    """On rank 0: the tensors `names` as rank `src` holds them. On `src`: send them. Elsewhere: nothing."""
    if src == me == 0:
        return {n: local[n].detach().cpu() for n in names}
    if me == src:
        for n in names:
            _send(local[n], 0, device)
    elif me == 0:
        return {n: _recv(src, device) for n in names}
    return None


def _sources(coords: list[RankCoords], layout: ParallelLayout) -> tuple[dict, dict]:
    dense = {(c.pp, c.tp): c.rank for c in coords if c.dp == 0}
    expert = {(c.pp, c.ep): c.rank for c in coords if c.edp == 0}
    want_d = {(s, t) for s in range(layout.pp) for t in range(layout.tp)}
    want_e = {(s, e) for s in range(layout.pp) for e in range(layout.ep)}
    if set(dense) != want_d or set(expert) != want_e:
        raise RuntimeError(f"ranks {coords} do not cover layout {layout}")
    return dense, expert


def gather_hf_tensors(
    local: dict[str, torch.Tensor],
    cfg: GptOssConfig,
    layout: ParallelLayout,
    me: RankCoords,
    coords: list[RankCoords],
    te: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, BF16 CPU tensor) in checkpoint order on rank 0; on other ranks sends their pieces, yields nothing.

    `local` is this rank's megatron state (names as `named_parameters` gives them, stage-local layer numbers).
    """
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dense_src, expert_src = _sources(coords, layout)
    layers_per_stage, experts_per_rank = cfg.num_hidden_layers // layout.pp, cfg.num_local_experts // layout.ep
    suffixes = layer_suffixes(experts_per_rank, te)
    dense_sfx = [s for s in suffixes if not s.startswith("mlp.experts.")]
    expert_sfx = [s for s in suffixes if s.startswith("mlp.experts.")]

    def dense_pieces(stage: int, names: list[str]) -> Pieces | None:
        got = [fetch_to_rank0(me.rank, dense_src[(stage, t)], local, names, device) for t in range(layout.tp)]
        return got if me.rank == 0 else None

    def embedding():
        pieces = dense_pieces(0, [GLOBAL_TABLE["model.embed_tokens.weight"]])
        return (lambda: embedding_to_hf(pieces)) if me.rank == 0 else None

    def layer_unit(layer: int):
        stage, n = divmod(layer, layers_per_stage)
        prefix = f"decoder.layers.{n}."
        dense = dense_pieces(stage, [prefix + s for s in dense_sfx])
        experts = [fetch_to_rank0(me.rank, expert_src[(stage, e)], local, [prefix + s for s in expert_sfx], device)
                   for e in range(layout.ep)]
        if me.rank != 0:
            return None

        def strip(pieces: Pieces) -> Pieces:
            return [{k[len(prefix):]: v for k, v in d.items()} for d in pieces]

        return lambda: layer_to_hf(cfg, layer, strip(dense), strip(experts), te)

    def final():
        pieces = dense_pieces(layout.pp - 1, [GLOBAL_TABLE["model.norm.weight"], GLOBAL_TABLE["lm_head.weight"]])
        return (lambda: final_to_hf(pieces)) if me.rank == 0 else None

    units = [embedding] + [lambda layer=layer: layer_unit(layer) for layer in range(cfg.num_hidden_layers)] + [final]
    # Before each unit, and once at the end, rank 0 says whether to go on: a failure on rank 0 (a bad tensor, a
    # full disk in the writer consuming this generator) stops every rank instead of leaving them blocked in send.
    error: str | None = None
    for unit in units:
        _go(error)
        convert = unit()
        if convert is None:
            continue
        try:
            tensors = convert()
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised here
            error = f"{type(e).__name__}: {e}"
            continue
        try:
            yield from tensors.items()
        except GeneratorExit:  # the consumer on rank 0 (the writer) failed and dropped this generator
            _verdict("rank 0 stopped writing (its error is in rank 0's log)")
            raise
    _go(error)


def _verdict(error: str | None) -> str | None:
    """Collective: rank 0's verdict so far, on every rank."""
    import torch.distributed as dist

    msg = [error]
    dist.broadcast_object_list(msg, src=0)
    return msg[0]


def _go(error: str | None) -> None:
    """Every rank raises the same error if rank 0 has one."""
    verdict = _verdict(error)
    if verdict is not None:
        raise CheckpointError(f"export stopped: {verdict}")
