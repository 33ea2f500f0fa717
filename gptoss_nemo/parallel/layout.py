"""A parallel layout (TP x CP x EP x PP, expert tensor parallel 1) and which part of gpt-oss one rank owns.

Context parallelism (cp > 1, training under Transformer Engine's spec only) splits every sequence over CP ranks
(megatron's load-balanced 2 x CP chunks; train/step.py) and runs attention with TE's all-to-all exchange (`a2a`:
the only one of TE's context-parallel attentions that takes gpt-oss's sinks and sliding window), which gives each
CP rank all positions of heads / CP heads: the KV heads of a TP rank must divide by CP. Dense parameters are
replicated over CP ranks (their gradients reduced over DP x CP); the expert grid folds CP into expert data
parallelism, as megatron does.

Megatron orders ranks TP fastest, then (for experts) EP, then PP; with ETP=1 the expert-parallel group is
carved out of the data-parallel x tensor-parallel ranks of a stage, so world % (TP*PP) and
(world / PP) % EP must both be 0. Layers split evenly over PP stages, experts evenly over EP ranks,
query groups (and with them heads) and vocabulary rows evenly over TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig


@dataclass(frozen=True, slots=True)
class LayerIndex:
    """Where a pipeline stage's layers and an EP rank's experts sit in the global model."""

    first_layer: int
    num_layers: int
    first_expert: int
    num_experts: int


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1

    def validate(self, cfg: GptOssConfig, world_size: int, te: bool = True, training: bool = True) -> None:
        """Raise ConfigError naming the first dimension that does not divide (or that the spec cannot run).
        training=False (import, export, evaluation) allows tp>1 on megatron's local spec."""
        for name, value in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp), ("cp", self.cp)):
            if value < 1:
                raise ConfigError(f"parallelism.{name}={value} must be >= 1")
        checks = [
            (cfg.num_local_experts % self.ep, f"num_local_experts={cfg.num_local_experts} is not divisible by ep={self.ep}"),
            (cfg.num_key_value_heads % self.tp,
             f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp={self.tp}"),
            (cfg.vocab_size % self.tp, f"vocab_size={cfg.vocab_size} is not divisible by tp={self.tp}"),
            (cfg.num_hidden_layers % self.pp, f"num_hidden_layers={cfg.num_hidden_layers} is not divisible by pp={self.pp}"),
            (world_size % (self.tp * self.pp * self.cp),
             f"world size {world_size} is not divisible by {'tp*cp*pp' if self.cp > 1 else 'tp*pp'}="
             f"{self.tp * self.cp * self.pp}"),
            (cfg.num_key_value_heads % (self.tp * self.cp),
             f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp*cp={self.tp * self.cp} (TE's "
             "all-to-all context-parallel attention gives each CP rank whole KV heads)"),
            ((world_size // self.pp) % self.ep,
             f"world size {world_size} / pp={self.pp} is not divisible by ep={self.ep}"),
        ]
        if self.cp > 1 and not (training and te):
            checks.append((True, "context parallelism needs Transformer Engine's spec in training (model.impl=te: "
                                 "TE's all-to-all attention with sinks and the sliding window); the local spec has "
                                 "none, and import, export and evaluation run without it (cp=1)"))
        if training and not te and self.tp > 1:
            # megatron's MoE layer refuses tensor parallelism without sequence parallelism in training, and the
            # local spec's torch norms refuse sequence parallelism. Import, export and evaluation are fine.
            checks.append((True, "training with tp>1 needs Transformer Engine (the NeMo container): megatron's "
                                 "local spec cannot run MoE layers tensor-parallel in training; use tp=1 with ep/pp"))
        for bad, message in checks:
            if bad:
                raise ConfigError(f"parallel layout {self}: {message}")

    def owned(self, cfg: GptOssConfig, ep_rank: int, pp_rank: int) -> LayerIndex:
        """The layers of stage `pp_rank` and the experts of expert-parallel rank `ep_rank`."""
        layers, experts = cfg.num_hidden_layers // self.pp, cfg.num_local_experts // self.ep
        return LayerIndex(first_layer=pp_rank * layers, num_layers=layers,
                          first_expert=ep_rank * experts, num_experts=experts)

    def megatron_overrides(self, te: bool) -> dict:
        """TransformerConfig fields for this layout. Sequence parallelism goes with TP under TE (megatron needs it
        for TP with EP, and it saves activation memory); the local spec's torch norms cannot do it."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": 1,
            "sequence_parallel": te and self.tp > 1,
            "context_parallel_size": self.cp,
            **({"cp_comm_type": "a2a"} if self.cp > 1 else {}),  # megatron's default (p2p) refuses sinks in TE
        }

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel replicas: ranks that see different sequences (CP ranks share theirs)."""
        return world_size // (self.tp * self.cp * self.pp)

    def __str__(self) -> str:
        return f"tp={self.tp} ep={self.ep} pp={self.pp}" + (f" cp={self.cp}" if self.cp > 1 else "")

    def stage_of(self, cfg: GptOssConfig, layer: int) -> int:
        return layer // (cfg.num_hidden_layers // self.pp)
