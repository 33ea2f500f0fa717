"""A parallel layout (TP x EP x PP, expert tensor parallel 1) and which part of gpt-oss one rank owns.

Megatron orders ranks TP fastest, then (for experts) EP, then PP; with ETP=1 the expert-parallel group is
carved out of the data-parallel x tensor-parallel ranks of a stage, so world % (TP*PP) and
(world / PP) % EP must both be 0. Layers split evenly over PP stages, experts evenly over EP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_nemo.convert.mapping import LayerIndex
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    tp: int = 1
    ep: int = 1
    pp: int = 1

    def validate(self, cfg: GptOssConfig, world_size: int) -> None:
        """Raise ConfigError naming the first dimension that does not divide."""
        for name, value in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp)):
            if value < 1:
                raise ConfigError(f"parallelism.{name}={value} must be >= 1")
        checks = [
            (cfg.num_local_experts % self.ep, f"num_local_experts={cfg.num_local_experts} is not divisible by ep={self.ep}"),
            (cfg.num_key_value_heads % self.tp,
             f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp={self.tp}"),
            (cfg.num_hidden_layers % self.pp, f"num_hidden_layers={cfg.num_hidden_layers} is not divisible by pp={self.pp}"),
            (world_size % (self.tp * self.pp), f"world size {world_size} is not divisible by tp*pp={self.tp * self.pp}"),
            ((world_size // self.pp) % self.ep,
             f"world size {world_size} / pp={self.pp} is not divisible by ep={self.ep}"),
        ]
        for bad, message in checks:
            if bad:
                raise ConfigError(f"parallel layout tp={self.tp} ep={self.ep} pp={self.pp}: {message}")

    def owned(self, cfg: GptOssConfig, ep_rank: int, pp_rank: int) -> LayerIndex:
        """The layers of stage `pp_rank` and the experts of expert-parallel rank `ep_rank`."""
        layers, experts = cfg.num_hidden_layers // self.pp, cfg.num_local_experts // self.ep
        return LayerIndex(first_layer=pp_rank * layers, num_layers=layers,
                          first_expert=ep_rank * experts, num_experts=experts)
