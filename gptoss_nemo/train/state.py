"""Training checkpoints: model, optimizer, LR schedule, data position and RNG in one megatron dist checkpoint.

    RUN/checkpoints/step_0000100/    dist checkpoint {model, optimizer, scheduler, step} (torch_dist)
                                     + gptoss_nemo.json + hf/ (so `gptoss-nemo export` and later stages read it)
                                     + rng/rank_00000.pt ... (CPU, CUDA and megatron tracker states per rank)
                                     + modelopt_state/ in QAT (the quantizers; metadata "quant": {format})

The model and the distributed optimizer's state (FP32 main weights, Adam moments) are saved per parameter in
model space (`fully_reshardable`: gathered over the data-parallel ranks at save, sliced at load; megatron-core
0.19 refuses the older `fully_sharded_model_space`), so a checkpoint loads under another TP/EP/PP layout; the RNG
files are used only when the world size is unchanged. The data position is the step: global batch t is a function
of (seed, t). The model and optimizer keys are the same under every implementation (convert/checkpoint_keys.py), so
a run started under TE's spec resumes under the local spec's and the reverse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss_nemo.convert.dist_checkpoint import save_quant_state, write_checkpoint_meta
from gptoss_nemo.convert.hf_to_megatron import unwrap
from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.train import checkpoint_dirs

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _rng_file(root: Path, rank: int) -> Path:
    return Path(root) / "rng" / f"rank_{rank:05d}.pt"


def save_training(root: Path, step: int, model, optimizer, scheduler, *, keep_last: int, cfg, layout,
                  source: str, side_files_from: Path | None, extra: dict | None = None) -> Path:
    """Collective. Complete only once renamed into place; then `latest` points at it and old ones are pruned."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel

    from gptoss_nemo.checkpoint.writer import collective_atomic_dir

    Path(root).mkdir(parents=True, exist_ok=True)
    target = checkpoint_dirs.step_dir(root, step)
    with collective_atomic_dir(target, overwrite=True) as tmp:
        model_sd = unwrap(model).sharded_state_dict()
        state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
                 "scheduler": scheduler.state_dict(), "step": step}
        dist_checkpointing.save(state, str(tmp))
        save_quant_state(model, tmp, extra)
        write_checkpoint_meta(tmp, cfg, layout=layout, impl=unwrap(model).config.impl, source=source,
                              side_files_from=side_files_from, extra={"step": step, **(extra or {})})
        if dist.get_rank() == 0:
            (tmp / "rng").mkdir()
        dist.barrier()
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(),
               "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        torch.save(rng, _rng_file(tmp, dist.get_rank()))
    if dist.get_rank() == 0:
        checkpoint_dirs.mark_latest(root, step, keep_last)
    dist.barrier()
    return target


def load_rng(path: Path) -> dict:
    """A rank's RNG file: tensors and lists only (weights_only), so nothing in a run directory runs code."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: holds more than RNG tensors ({str(e).splitlines()[0]}); this package never "
                              "writes such a file: delete the checkpoint or restore it from a trusted copy") from None


def load_training(root: Path, step: int, model, optimizer, scheduler) -> None:
    """Collective. Restores what save_training wrote (the RNG states only when the world size is unchanged); a
    QAT model must have its quantizers restored before (quantize/qat.py)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel

    from gptoss_nemo.compat import fill_empty_optimizer_state, unshare_adamw_steps
    from gptoss_nemo.convert.checkpoint_keys import checkpoint_entries, load_into, match_checkpoint

    path = checkpoint_dirs.step_dir(root, step)
    fill_empty_optimizer_state(optimizer)
    gpt = unwrap(model)
    model_sd = gpt.sharded_state_dict()
    matched = match_checkpoint(model_sd, checkpoint_entries(path))  # any implementation's checkpoint
    request = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                                 metadata=OPTIMIZER_FORMAT)}
    state = dist_checkpointing.load(request, str(path))
    load_into(gpt, state["model"], matched, str(path))
    optimizer.load_state_dict(state["optimizer"])
    unshare_adamw_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if state["step"] != step:
        raise RuntimeError(f"{path}: holds step {state['step']}, expected {step}")
    rng_file = _rng_file(path, dist.get_rank())
    same_world = len(list((Path(path) / "rng").glob("rank_*.pt"))) == dist.get_world_size()
    if same_world and rng_file.is_file():
        rng = load_rng(rng_file)
        torch.set_rng_state(rng["cpu"])
        torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
