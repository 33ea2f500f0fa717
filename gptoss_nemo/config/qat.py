"""The QAT / PTQ recipe: the SFT sections (data, layout, router, optimizer, train, cluster) plus `quant`, with
QAT's own defaults (a low learning rate, a short warmup)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_nemo.config.sft import OptimizerConfig, SFTRecipe, TrainConfig
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.quantize.formats import FORMATS

# Modules that stay BF16, and why (named in the error when a recipe asks to quantize them).
BF16_ONLY = {
    "router": "the router stays BF16: its top-k choice is what the load-balancing loss trains, and the serving "
              "checkpoints (openai/gpt-oss) keep it unquantized",
    "attention": "attention stays BF16, as in openai/gpt-oss (only the expert MLPs are MXFP4)",
    "embedding": "the embedding stays BF16, as in openai/gpt-oss",
    "output_layer": "the output layer stays BF16, as in openai/gpt-oss",
}


@dataclass(kw_only=True, slots=True)
class QuantConfig:
    format: str = "mxfp4"  # mxfp4 | nvfp4 | nvfp4_w4a4
    modules: list[str] = field(default_factory=lambda: ["experts"])
    calibration_batches: int = 8  # global batches of the training data, for formats that quantize activations

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"quant.format={self.format!r}; use one of {', '.join(FORMATS)}")
        for m in self.modules:
            if m in BF16_ONLY:
                raise ConfigError(f"quant.modules has {m!r}: {BF16_ONLY[m]}")
            if m != "experts":
                raise ConfigError(f"quant.modules has {m!r}; the only quantized modules are [experts]")
        if not self.modules:
            raise ConfigError("quant.modules is empty; QAT quantizes [experts]")
        if self.calibration_batches < 1:
            raise ConfigError(f"quant.calibration_batches={self.calibration_batches} must be >= 1")


@dataclass(kw_only=True, slots=True)
class QATRecipe(SFTRecipe):
    quant: QuantConfig = field(default_factory=QuantConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, min_lr=1e-6, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, out_dir="runs/qat"))

    def __post_init__(self):
        SFTRecipe.__post_init__(self)
        if self.optimizer.lr > 1e-4:
            raise ConfigError(f"optimizer.lr={self.optimizer.lr} is too high for QAT (it refines an SFT model under "
                              "fake quantization; typical 1e-6 to 5e-5)")
