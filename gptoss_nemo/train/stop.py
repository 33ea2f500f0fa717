"""A graceful stop between steps: the launcher's signal trap (or a person) creates the stop file; every rank
learns of it from rank 0 (one view for all: shared file systems can lag between nodes), then the loop
checkpoints and exits so that the same command resumes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "GPTOSS_NEMO_STOP_FILE"


def stop_file() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def stop_requested(path: Path | None, device) -> bool:
    """Collective (every rank, the same `path`): whether rank 0 sees the stop file."""
    import torch.distributed as dist

    if path is None:
        return False
    flag = torch.tensor([float(dist.get_rank() == 0 and path.exists())], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
