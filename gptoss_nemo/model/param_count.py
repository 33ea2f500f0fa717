"""Parameter counts of a gpt-oss model, total and active per token.

Active counts what one token's forward pass multiplies with: attention, router, norms, the top-k experts
of each layer and the output layer; the input embedding is a lookup and is not counted (the convention of
the gpt-oss model card: 20b 3.6B active, 120b 5.1B active).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_nemo.model.hf_config import GptOssConfig


@dataclass(frozen=True, slots=True)
class ParamCount:
    total: int
    active: int
    per_expert: int
    attention_per_layer: int
    embedding: int


def count_parameters(cfg: GptOssConfig) -> ParamCount:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attention = (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + cfg.num_attention_heads  # qkv, o, sinks
    expert = (h * 2 * i + 2 * i) + (i * h + h)  # gate_up + bias, down + bias
    router = cfg.num_local_experts * h + cfg.num_local_experts
    norms = 2 * h
    embedding = cfg.vocab_size * h
    layer_fixed = attention + router + norms
    layers = cfg.num_hidden_layers
    total = layers * (layer_fixed + cfg.num_local_experts * expert) + 2 * embedding + h
    active = layers * (layer_fixed + cfg.num_experts_per_tok * expert) + embedding + h
    return ParamCount(total=total, active=active, per_expert=expert, attention_per_layer=attention, embedding=embedding)
