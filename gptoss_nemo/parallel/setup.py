"""Process group and megatron parallel state for a layout, and where each rank sits in it.

Launch with torchrun (one node) or srun with one task per GPU (launch/): RANK, WORLD_SIZE, LOCAL_RANK come from
torchrun's variables or, inside an srun step, from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);
MASTER_ADDR and MASTER_PORT from the environment (the sbatch script sets them). A plain `python` run is a world of
one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch

from gptoss_nemo.errors import ConfigError, DeviceError
from gptoss_nemo.parallel.layout import ParallelLayout


def _in_srun_step() -> bool:
    return "RANK" not in os.environ and "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ


def env_rank() -> int:
    name = "SLURM_PROCID" if _in_srun_step() else "RANK"
    return _env_int(name, 0, minimum=0)


def env_world_size() -> int:
    """The launcher's world size; this process's rank is checked against it here too (every pre-flight asks)."""
    name = "SLURM_NTASKS" if _in_srun_step() else "WORLD_SIZE"
    world, rank = _env_int(name, 1, minimum=1), env_rank()
    if rank >= world:
        raise ConfigError(f"this process has rank {rank} in a world of {world} ({name}): launch with torchrun/srun "
                          "(which set both), or unset RANK and WORLD_SIZE")
    return world


def _env_int(name: str, default: int, minimum: int) -> int:
    """A launcher's integer variable; a malformed one is an input error, not a traceback."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer >= {minimum}: launch with "
                          "torchrun/srun (which set it), or unset it")
    return value


def _torch_env_from_slurm() -> None:
    if _in_srun_step():
        if "MASTER_ADDR" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError("srun step without MASTER_ADDR/MASTER_PORT: launch with `gptoss-nemo launch`, or export "
                              "MASTER_ADDR (the first node of the allocation) and MASTER_PORT before srun")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ.get("SLURM_NTASKS", "1"),
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if os.environ["WORLD_SIZE"] == "1":
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))


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
        raise DeviceError("this stage needs CUDA GPUs and none is visible here: run it on a GPU node (`gptoss-nemo "
                          "plan` and `--dry-run` check a recipe without one)")
    _torch_env_from_slurm()
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
        context_parallel_size=layout.cp,
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
