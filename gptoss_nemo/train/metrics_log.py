"""Training metrics: one JSON line per step in RUN/metrics.jsonl (what the plots read), TensorBoard scalars always,
Weights & Biases when a project is configured. Only one rank logs (the caller decides which)."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            import wandb  # optional: installed by users who configure a project

            self.wandb = wandb.init(project=wandb_project, dir=str(self.dir), config=run_config or {})

    def log(self, step: int, values: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
