"""Where a stage runs: the Slurm allocation and the container (recipe section `cluster`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gptoss_nemo.errors import ConfigError

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")  # written into #SBATCH lines, which sbatch does not unquote


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"  # Slurm time limit, [D-]HH:MM:SS
    job_name: str = "gptoss-nemo"
    container_image: str | None = None  # pyxis/enroot image, e.g. nvcr.io#nvidia/nemo:25.11
    container_mounts: list[str] = field(default_factory=list)  # "host_path:container_path[:flags]"
    env: list[str] = field(default_factory=list)  # extra "NAME=value" for every task
    requeue: bool = True  # after a stop before the time limit (or a preemption), requeue the job
    stop_before_limit_s: int = 600  # signal the job this long before its limit: it checkpoints and stops
    master_port: int = 29500

    def __post_init__(self):
        if self.nodes < 1:
            raise ConfigError(f"cluster.nodes={self.nodes} must be >= 1")
        if not 1 <= self.gpus_per_node <= 16:
            raise ConfigError(f"cluster.gpus_per_node={self.gpus_per_node} must be between 1 and 16")
        t = _TIME.match(self.time)
        if not t or (t.group(1) is not None and int(t.group(2)) > 23):
            raise ConfigError(f"cluster.time={self.time!r} is not a Slurm time limit: use HH:MM:SS or D-HH:MM:SS "
                              "(minutes and seconds below 60, hours below 24 after a day count)")
        for key in ("partition", "account", "job_name"):
            value = getattr(self, key)
            if value is not None and not _SLURM_NAME.match(value):
                raise ConfigError(f"cluster.{key}={value!r}: use letters, digits and . , _ - only")
        for m in self.container_mounts:
            if ":" not in m:
                raise ConfigError(f"cluster.container_mounts entry {m!r} must be host_path:container_path[:flags]")
        for e in self.env:
            if "=" not in e or not _ENV_NAME.match(e.split("=", 1)[0]):
                raise ConfigError(f"cluster.env entry {e!r} must be NAME=value with NAME a shell variable name")
        if not 1024 <= self.master_port <= 65535:
            raise ConfigError(f"cluster.master_port={self.master_port} must be in 1024..65535")
        if not 0 <= self.stop_before_limit_s < self.time_limit_s // 2:
            raise ConfigError(f"cluster.stop_before_limit_s={self.stop_before_limit_s} must be >= 0 and under half of "
                              f"cluster.time={self.time} (Slurm would signal the stop at once)")

    @property
    def time_limit_s(self) -> int:
        days, _, hms = self.time.rpartition("-")
        h, m, sec = (int(x) for x in hms.split(":"))
        return int(days or 0) * 86400 + h * 3600 + m * 60 + sec

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node
