"""The pipeline recipe (`gptoss-nemo pipeline`): one file for import -> SFT -> PTQ -> QAT -> export -> eval.

Shared sections (data, parallel, router, cluster) apply to every stage; `sft` and `qat` carry each training
stage's optimizer and schedule; every output lives under `run_dir`:

    RUN/hf-tiny/ (model.make_tiny)   RUN/import/   RUN/sft/   RUN/ptq/   RUN/qat/   RUN/export/<format>/
    RUN/eval/ (exports evaluated)    RUN/eval.json + the stage table   RUN/recipe.json (the resolved recipe)

The per-stage recipes it builds (`sft_recipe`, `qat_recipe`) are the SFTRecipe / QATRecipe of `gptoss-nemo sft`
and `qat`, so the same checks apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gptoss_nemo.config.cluster import ClusterConfig
from gptoss_nemo.config.load import stage_keys
from gptoss_nemo.config.qat import QATRecipe, QuantConfig
from gptoss_nemo.config.sft import ModelConfig, OptimizerConfig, SFTRecipe, TrainConfig
from gptoss_nemo.data.dataset import DataConfig
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.parallel.layout import ParallelLayout

EXPORT_FORMATS = ("mxfp4", "nvfp4", "bf16")


def is_pipeline_recipe(path: str | Path) -> bool:
    """A pipeline recipe has `run_dir` at the top (a stage recipe has `checkpoint`)."""
    from omegaconf import OmegaConf

    try:
        return "run_dir" in (OmegaConf.load(path) or {})
    except Exception:  # noqa: BLE001 - a broken file is load_recipe's to report
        return False


@dataclass(kw_only=True, slots=True)
class ModelSource(ModelConfig):
    """Where the model comes from, and (ModelConfig) which implementation runs it in every stage."""

    hf: str | None = None  # a Hugging Face gpt-oss checkpoint directory (openai/gpt-oss-20b as downloaded)
    make_tiny: bool = False  # instead: write the seeded tiny gpt-oss into RUN/hf-tiny (quickstart, tests)
    tiny_seed: int = 1234

    def __post_init__(self):
        ModelConfig.__post_init__(self)
        if bool(self.hf) == self.make_tiny:
            raise ConfigError("model: set exactly one of model.hf (a Hugging Face gpt-oss checkpoint directory) and "
                              "model.make_tiny=true (the seeded tiny model)")


@dataclass(kw_only=True, slots=True)
class TrainStage:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(kw_only=True, slots=True)
class QATStage:
    enabled: bool = True
    quant: QuantConfig = field(default_factory=QuantConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, min_lr=1e-6, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200))


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    enabled: bool = True
    data: list[str] = field(default_factory=lambda: ["synthetic:arithmetic:64:7"])
    checker: str = "arithmetic"
    samples: int = 64
    max_new_tokens: int = 64


@dataclass(kw_only=True, slots=True)
class PipelineRecipe:
    run_dir: str
    model: ModelSource
    data: DataConfig
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    router: RouterConfig = field(default_factory=RouterConfig)
    sft: TrainStage = field(default_factory=TrainStage)
    ptq: bool = True  # the PTQ baseline (the QAT format, no training)
    qat: QATStage = field(default_factory=QATStage)
    export: list[str] = field(default_factory=lambda: ["mxfp4"])
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        trained = self.qat.quant.format if self.qat.enabled else None
        for fmt in self.export:
            if fmt not in EXPORT_FORMATS:
                raise ConfigError(f"export has {fmt!r}; use formats from {', '.join(EXPORT_FORMATS)}")
            if fmt == "nvfp4" and trained not in ("nvfp4", "nvfp4_w4a4"):
                raise ConfigError(f"export has nvfp4 but qat.quant.format is {trained}: an NVFP4 export needs an "
                                  "NVFP4 QAT (qat.quant.format=nvfp4 or nvfp4_w4a4)")
            if fmt == "mxfp4" and trained not in (None, "mxfp4"):
                raise ConfigError(f"export has mxfp4 but QAT trains {trained}: export [{trained.split('_')[0]}] or "
                                  "[bf16]")
        for key, stage in (("sft", self.sft), ("qat", self.qat)):
            if stage.train.out_dir != TrainConfig().out_dir:
                raise ConfigError(f"{key}.train.out_dir is set by the pipeline (run_dir/{key}); set run_dir instead")
        from gptoss_nemo.evaluate.checkers import get_checker

        get_checker(self.eval.checker)
        self.sft_recipe()  # the stage recipes' own checks (warmup < steps, QAT learning rate, ...)
        if self.qat.enabled:
            self.qat_recipe()

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf-tiny" if self.model.make_tiny else Path(self.model.hf)

    def model_config(self) -> ModelConfig:
        return ModelConfig(impl=self.model.impl)

    def sft_recipe(self) -> SFTRecipe:
        with stage_keys("sft"):
            return SFTRecipe(checkpoint=str(self.root / "import"), data=self.data, model=self.model_config(),
                             parallel=self.parallel, router=self.router, optimizer=self.sft.optimizer,
                             train=dataclasses.replace(self.sft.train, out_dir=str(self.root / "sft")),
                             cluster=self.cluster)

    def sft_final(self) -> Path:
        return self.root / "sft" / "checkpoints" / f"step_{self.sft.train.steps:07d}"

    def qat_recipe(self, stage: str = "qat") -> QATRecipe:
        """QAT (or, stage="ptq", PTQ: same quantization, RUN/ptq) of the SFT stage's last checkpoint."""
        with stage_keys("qat"):
            return QATRecipe(checkpoint=str(self.sft_final()), data=self.data, model=self.model_config(),
                             parallel=self.parallel, router=self.router, quant=self.qat.quant,
                             optimizer=self.qat.optimizer,
                             train=dataclasses.replace(self.qat.train, out_dir=str(self.root / stage)),
                             cluster=self.cluster)

    def qat_final(self) -> Path:
        return self.root / "qat" / "checkpoints" / f"step_{self.qat.train.steps:07d}"
