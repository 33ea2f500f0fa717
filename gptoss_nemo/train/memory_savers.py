"""The recipe's memory settings, decided once: what megatron-core runs for them and what they cost per GPU.

    train.recompute           megatron's activation recompute (TransformerConfig recompute_granularity/method/...)
        none                  every layer keeps its activations for the backward
        selective             recompute_modules of every layer are run again in the backward: moe (the MoE block,
                              router, all-to-alls and experts: most of a gpt-oss layer's activations), moe_act (the
                              experts' activation, TE's grouped GEMM only), layernorm, core_attn
        full                  a layer keeps only its input and runs again in the backward (recompute_layers: the
                              first N layers of each pipeline stage, megatron's block method; else all, uniform 1)
    optimizer states          megatron's distributed optimizer, per parameter of the rank's shard:
        default               FP32 main weight, m and v: 12 bytes; the FP32 gradient buffer holds 4 per held
                              parameter
        precision-aware       exp_avg_dtype / exp_avg_sq_dtype / main_params_dtype below fp32: Transformer Engine's
                              FusedAdam keeps m and v in that dtype (2 bytes each) and FP32 master weights (4;
                              fp16 masters: 2, lossy). Not megatron's 16-bit remainders of the BF16 weights
                              (store_param_remainders, 2 bytes, exact): a checkpoint of them does not load back
                              (megatron-core 0.19.2 + TE 2.20.2, `fully_reshardable`: TE's set_scaled_state asserts
                              an int16 master_param and gets the FP32 one; GPU tier, thirteenth session)
        main_grads_dtype=bf16 the gradient buffer and its reduction in BF16 (2 bytes per held parameter)
        cpu_offload_fraction  that share of the shard's FP32 states and their update on the CPU (megatron's
                              HybridDeviceOptimizer, torch's AdamW there, TE's FusedAdam on the GPU part)

Everything here is checked before any GPU time (`check`); the planner (plan/memory.py) reads the byte counts from
the same object, so what is planned is what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptoss_nemo.errors import ConfigError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True, slots=True)
class MemorySavers:
    recompute: str = "none"
    recompute_modules: tuple[str, ...] = ()
    recompute_layers: int | None = None
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    main_params_dtype: str = "fp32"
    main_grads_dtype: str = "fp32"
    cpu_offload_fraction: float = 0.0

    @classmethod
    def of(cls, train, optimizer) -> MemorySavers:
        """From a recipe's `train` and `optimizer` sections (config/sft.py validates each value)."""
        return cls(recompute=train.recompute,
                   recompute_modules=tuple(train.recompute_modules) if train.recompute == "selective" else (),
                   recompute_layers=train.recompute_layers, exp_avg_dtype=optimizer.exp_avg_dtype,
                   exp_avg_sq_dtype=optimizer.exp_avg_sq_dtype, main_params_dtype=optimizer.main_params_dtype,
                   main_grads_dtype=optimizer.main_grads_dtype, cpu_offload_fraction=optimizer.cpu_offload_fraction)

    @property
    def precision_aware(self) -> bool:
        """megatron's precision-aware optimizer (TE's FusedAdam): lighter states, or the offloading optimizer,
        which megatron runs only with it."""
        return (any(d != "fp32" for d in (self.exp_avg_dtype, self.exp_avg_sq_dtype, self.main_params_dtype))
                or self.cpu_offload_fraction > 0)

    def changed(self) -> dict:
        """The settings that are on, as printed by `plan` and the benchmark rows."""
        return {k: v for k, v in asdict(self).items() if v not in ((), None)}

    def check(self, impl: str, cfg, layout, here: bool = True) -> None:
        """What the implementation, the layout (`cfg`'s layers over layout.pp stages) and the installed packages can
        run; here=False plans for another machine (a Slurm job's container, assumed to have Transformer Engine)."""
        layers_per_stage = cfg.num_hidden_layers // layout.pp
        if "moe_act" in self.recompute_modules and impl != "te":
            raise ConfigError(f"train.recompute_modules: moe_act with model.impl={impl}: megatron recomputes the "
                              "experts' activation inside TE's grouped GEMM only; use moe (the whole MoE block) or "
                              "model.impl=te")
        if self.recompute_layers is not None and self.recompute_layers > layers_per_stage:
            raise ConfigError(f"train.recompute_layers={self.recompute_layers} exceeds the {layers_per_stage} layers "
                              "of a pipeline stage (null recomputes every layer)")
        if self.precision_aware and here:
            from gptoss_nemo.model.impl import te_problem

            problem = te_problem()
            if problem:
                what = ("optimizer.cpu_offload_fraction > 0" if self.cpu_offload_fraction
                        else "optimizer states below fp32")
                raise ConfigError(f"{what} need Transformer Engine's FusedAdam (megatron's precision-aware "
                                  f"optimizer), whatever model.impl: {problem}; keep the optimizer.*_dtype at fp32 and "
                                  "optimizer.cpu_offload_fraction at 0 here")

    def transformer_fields(self) -> dict:
        """megatron TransformerConfig fields."""
        if self.recompute == "selective":
            return {"recompute_granularity": "selective", "recompute_modules": list(self.recompute_modules)}
        if self.recompute == "full":
            block = self.recompute_layers is not None
            return {"recompute_granularity": "full", "recompute_method": "block" if block else "uniform",
                    "recompute_num_layers": self.recompute_layers if block else 1}
        return {}

    def optimizer_fields(self) -> dict:
        """megatron OptimizerConfig fields."""
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if not self.precision_aware:
            return {}
        fields = {"use_precision_aware_optimizer": True, "exp_avg_dtype": dtype[self.exp_avg_dtype],
                  "exp_avg_sq_dtype": dtype[self.exp_avg_sq_dtype], "main_params_dtype": dtype[self.main_params_dtype],
                  "main_grads_dtype": dtype[self.main_grads_dtype], "store_param_remainders": False}
        if self.cpu_offload_fraction:
            fields |= {"optimizer_cpu_offload": True, "optimizer_offload_fraction": self.cpu_offload_fraction,
                       "overlap_cpu_optimizer_d2h_h2d": True}
        return fields

    @property
    def grad_reduce_in_fp32(self) -> bool:
        return self.main_grads_dtype == "fp32"

    # What the planner counts (plan/memory.py).
    @property
    def grad_bytes(self) -> int:
        """Gradient buffer bytes per parameter the rank holds."""
        return BYTES[self.main_grads_dtype]

    def optimizer_bytes(self) -> float:
        """GPU bytes per parameter of the rank's optimizer shard: master weight + m + v."""
        if self.cpu_offload_fraction:
            return 12 * (1 - self.cpu_offload_fraction)
        if not self.precision_aware:
            return 12
        return BYTES[self.main_params_dtype] + BYTES[self.exp_avg_dtype] + BYTES[self.exp_avg_sq_dtype]
