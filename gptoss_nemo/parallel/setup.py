"""Process group and megatron parallel state for a layout, and where each rank sits in it.

Launch with torchrun (one node) or srun (launch/): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT come from the environment; a plain `python` run is a world of one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch

from gptoss_nemo.parallel.layout import ParallelLayout


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class RankCoords:
    """A rank's coordinates: dense parameters are unique per (pp, tp), expert parameters per (pp, ep);
    dp / edp > 0 are replicas of them."""

    rank: int
    tp: int
    pp: int
    dp: int
    ep: int
    edp: int


def init_distributed(layout: ParallelLayout, seed: int = 1234) -> RankCoords:
    """NCCL process group on this rank's GPU, megatron parallel groups for `layout`, seeded RNG."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        raise RuntimeError("gpt-oss megatron runs need CUDA GPUs; none is visible on this machine")
    if "RANK" not in os.environ:  # a world of one, started without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1,  # megatron's default is ETP = TP; gpt-oss experts are never TP-split here
    )
    model_parallel_cuda_manual_seed(seed)
    return current_coords()


def current_coords() -> RankCoords:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return RankCoords(
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_rank(),
        dp=ps.get_data_parallel_rank(),
        ep=ps.get_expert_model_parallel_rank(),
        edp=ps.get_expert_data_parallel_rank(),
    )


def all_coords(me: RankCoords) -> list[RankCoords]:
    """Every rank's coordinates, on every rank."""
    import torch.distributed as dist

    out: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, asdict(me))
    return [RankCoords(**c) for c in out]


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
