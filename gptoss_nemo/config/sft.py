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


DTYPES = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe", "moe_act")  # megatron's names that apply to gpt-oss


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW on FP32 main weights (megatron's distributed optimizer), cosine decay to min_lr after warmup.

    Lighter optimizer states (train/memory_savers.py says what each costs and what megatron runs for it):
    exp_avg_dtype / exp_avg_sq_dtype (Adam's m and v) and main_params_dtype below fp32 turn on megatron's
    precision-aware optimizer (Transformer Engine's FusedAdam: the NeMo container has it, whatever model.impl).
    main_grads_dtype=bf16 accumulates and reduces gradients in BF16. cpu_offload_fraction moves that share of the
    optimizer's states and its update to the CPU (megatron's HybridDeviceOptimizer; FP32 states)."""

    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    main_params_dtype: str = "fp32"
    main_grads_dtype: str = "fp32"
    cpu_offload_fraction: float = 0.0

    def __post_init__(self):
        for name, allowed in (("exp_avg_dtype", DTYPES), ("exp_avg_sq_dtype", DTYPES),
                              ("main_params_dtype", ("fp32", "fp16")), ("main_grads_dtype", ("fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if not 0 <= self.cpu_offload_fraction <= 1:
            raise ConfigError(f"optimizer.cpu_offload_fraction={self.cpu_offload_fraction} must be in [0, 1]")
        lighter = [n for n in ("exp_avg_dtype", "exp_avg_sq_dtype", "main_params_dtype")
                   if getattr(self, n) != "fp32"]
        if self.cpu_offload_fraction and lighter:
            raise ConfigError(f"optimizer.cpu_offload_fraction={self.cpu_offload_fraction} with optimizer."
                              f"{lighter[0]}={getattr(self, lighter[0])}: megatron's CPU-offloading optimizer keeps "
                              f"FP32 states and would ignore it; use one or the other")
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
    recompute: str = "none"
    """Activation recompute (megatron's): none; selective (recompute_modules in every layer); full (whole layers,
    keeping only each layer's input: every layer, or the first recompute_layers of each pipeline stage)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["moe"])
    """selective: megatron's modules to recompute. moe (the whole MoE block, its all-to-alls included: most of a
    gpt-oss layer's activations), moe_act (the experts' activation; model.impl=te), layernorm, core_attn (no
    saving with fused attention, which keeps no score matrix)."""
    recompute_layers: int | None = None
    """full: recompute the first N layers of each pipeline stage and keep the others' activations (megatron's
    block method); null: every layer."""

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"train.recompute={self.recompute!r}; use one of {', '.join(RECOMPUTE)}")
        unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown:
            raise ConfigError(f"train.recompute_modules: {unknown[0]!r} is not a gpt-oss module megatron recomputes; "
                              f"use some of {', '.join(RECOMPUTE_MODULES)}")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ConfigError("train.recompute=selective with train.recompute_modules=[]: name the modules "
                              f"({', '.join(RECOMPUTE_MODULES)}) or set train.recompute=none")
        if self.recompute_layers is not None and (self.recompute != "full" or self.recompute_layers < 1):
            raise ConfigError(f"train.recompute_layers={self.recompute_layers} applies to train.recompute=full and "
                              "must be >= 1 (null: every layer)")
        for name in ("steps", "global_batch_size", "micro_batch_size", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")


def check_batch_split(global_batch_size: int, micro_batch_size: int, dp: int, world: int | None = None) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    if global_batch_size % (micro_batch_size * dp):
        where = f" (world size {world} / tp*cp*pp)" if world is not None else ""
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

    @property
    def memory(self):
        """The recipe's memory savers (recompute, optimizer states), as the training and the planner use them."""
        from gptoss_nemo.train.memory_savers import MemorySavers

        return MemorySavers.of(self.train, self.optimizer)

    def check_layout(self, cfg, world: int, te: bool) -> int:
        """The layout against the model and a world size, and the batch split; returns the data-parallel size."""
        self.parallel.validate(cfg, world, te=te)
        dp = self.parallel.data_parallel(world)
        check_batch_split(self.train.global_batch_size, self.train.micro_batch_size, dp, world)
        return dp
