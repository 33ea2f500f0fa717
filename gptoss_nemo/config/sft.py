"""The SFT recipe: typed sections, filled from recipes/*.yaml by gptoss_nemo.config.load.load_recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_nemo.config.cluster import ClusterConfig
from gptoss_nemo.data.dataset import DataConfig
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.impl import CHOICES
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.parallel.layout import ParallelLayout


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    impl: str = "auto"
    """Which implementation runs the model (model/impl.py): fused (megatron's local spec with the fused kernels),
    te (Transformer Engine's spec), reference (megatron's local reference modules), or auto: fused, and te where
    training needs tensor parallelism. Checkpoints load under any of them. `--local-spec` turns te/auto into fused."""

    def __post_init__(self):
        if self.impl not in CHOICES:
            raise ConfigError(f"model.impl={self.impl!r}; use one of {', '.join(CHOICES)}")


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW on FP32 main weights (megatron's distributed optimizer), cosine decay to min_lr after warmup."""

    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr={self.lr} must be > 0")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} must be in (0, optimizer.lr={self.lr}]")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    micro_batch_size: int = 1
    seed: int = 1234
    out_dir: str = "runs/sft"
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep_last: int = 2
    expert_max_share: float = 0.5  # warn when one expert takes more of a layer's routed tokens
    tensorboard: bool = True
    wandb_project: str | None = None
    plots: bool = True  # loss curves and expert-load heatmap (PNG) at the end of the run
    deterministic: bool = False  # deterministic kernels (slower): resumed and uninterrupted runs match bitwise

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "micro_batch_size", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")


def check_batch_split(global_batch_size: int, micro_batch_size: int, dp: int, world: int | None = None) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    if global_batch_size % (micro_batch_size * dp):
        where = f" (world size {world} / tp*pp)" if world is not None else ""
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size="
                          f"{micro_batch_size} x data-parallel size {dp}{where}")


@dataclass(kw_only=True, slots=True)
class SFTRecipe:
    checkpoint: str  # a gptoss-nemo checkpoint (gptoss-nemo import) to start from
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    router: RouterConfig = field(default_factory=RouterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        if not 0 <= self.optimizer.warmup_steps < self.train.steps:
            raise ConfigError(f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be >= 0 and below "
                              f"train.steps={self.train.steps} (warmup, then cosine decay to optimizer.min_lr)")

    def check_layout(self, cfg, world: int, te: bool) -> int:
        """The layout against the model and a world size, and the batch split; returns the data-parallel size."""
        self.parallel.validate(cfg, world, te=te)
        dp = world // (self.parallel.tp * self.parallel.pp)
        check_batch_split(self.train.global_batch_size, self.train.micro_batch_size, dp, world)
        return dp
