"""Named architectures: the two published gpt-oss models and a tiny one for tests and the quickstart.

The 20b and 120b numbers are those of openai/gpt-oss-20b and openai/gpt-oss-120b (config.json); published
sizes: 20.9B total / 3.6B active and 116.8B total / 5.1B active parameters (model card).
"""

from __future__ import annotations

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.hf_config import GptOssConfig

_SHARED = dict(
    hidden_size=2880,
    intermediate_size=2880,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_experts_per_tok=4,
    vocab_size=201088,
    sliding_window=128,
)


def gpt_oss_20b() -> GptOssConfig:
    return GptOssConfig(num_hidden_layers=24, num_local_experts=32, **_SHARED)


def gpt_oss_120b() -> GptOssConfig:
    return GptOssConfig(num_hidden_layers=36, num_local_experts=128, **_SHARED)


def tiny(
    layers: int = 4,
    hidden: int = 128,
    experts: int = 8,
    expert_width: int = 128,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 32,
    top_k: int | None = None,
) -> GptOssConfig:
    """A small gpt-oss: real vocabulary, window, rope and activation; every width a multiple of 32. top_k: 4, or
    every expert where there are fewer; a top_k above `experts` is refused (GptOssConfig.validate)."""
    return GptOssConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=expert_width,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=min(4, experts) if top_k is None else top_k,
    )


PRESETS = {"gpt-oss-20b": gpt_oss_20b, "gpt-oss-120b": gpt_oss_120b, "tiny": tiny}


def preset(name: str) -> GptOssConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
