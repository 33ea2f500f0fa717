"""The gpt-oss architecture as its Hugging Face `config.json` states it, validated.

`GptOssConfig.from_dict` accepts the openai/gpt-oss-* `config.json` (with `rope_scaling` and `rope_theta`)
and the transformers v5 spelling (`rope_parameters`); `to_dict` writes the openai layout. Anything that is
not gpt-oss, or that breaks a real constraint of the architecture, raises `ConfigError` naming the field.

`transformers_version` is written as `save_pretrained` writes it (openai's files say "4.55.0.dev0"): transformers
4.57.3 to 5.22 read it when they load a tokenizer of more than 100000 tokens from a local directory, and without it
they take the directory for a Mistral one and warn "... with an incorrect regex pattern ... This will lead to
incorrect tokenization" (`_patch_mistral_regex`, issue 22). Every release skips a version >= 5.0.0 there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_nemo.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"
MXFP4_MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
TRANSFORMERS_FLOOR = "5.0.0"  # pyproject's `transformers>=5.0`


@functools.cache
def transformers_version() -> str:
    """The `transformers_version` our config.json and generation_config.json state: the installed transformers,
    as its `save_pretrained` writes, or TRANSFORMERS_FLOOR when it is absent or older.

    Never below 5.0.0: 4.57.3-4.57.6 warn about a Mistral regex for a stated 4.57.3+ or a 5.0 pre-release, and
    4.57.3-5.22 for a missing field; every release with that heuristic skips a version >= 5.0.0.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
        from packaging.version import InvalidVersion, Version  # a dependency of transformers
    except (PackageNotFoundError, ImportError):
        return TRANSFORMERS_FLOOR
    try:
        return installed if Version(installed) >= Version(TRANSFORMERS_FLOOR) else TRANSFORMERS_FLOOR
    except InvalidVersion:
        return TRANSFORMERS_FLOOR


@dataclass(kw_only=True, slots=True)
class YarnRope:
    """YaRN rotary embedding (`rope_scaling` in config.json)."""

    theta: float = 150000.0
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False
    """True rounds the correction range to integers (transformers' default); gpt-oss sets False."""


@dataclass(kw_only=True, slots=True)
class GptOssConfig:
    """Architecture numbers of one gpt-oss model. Field names follow config.json."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    """Width of each expert's MLP (the gate and up halves each have this many rows)."""
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int = 201088
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    """Per layer: sliding_attention or full_attention. Empty means alternating, sliding first."""
    rope: YarnRope = field(default_factory=YarnRope)
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    router_aux_loss_coef: float = 0.9
    quantized: bool = True
    """True: experts stored as MXFP4 blocks/scales (quantization_config.quant_method = mxfp4)."""
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)]
        self.validate()

    def validate(self) -> None:
        positive = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                    "vocab_size", "sliding_window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(
                    f"config.json: {name}={getattr(self, name)} is not a multiple of 32, which MXFP4 blocks need"
                )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim={self.head_dim} is odd; rotary embeddings rotate pairs of "
                              "dimensions, so it must be even")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_local_experts={self.num_local_experts}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"config.json: layer_types has {bad}; allowed: {SLIDING}, {FULL}")

    @property
    def sliding_layers(self) -> list[bool]:
        return [t == SLIDING for t in self.layer_types]

    # ---- config.json <-> dataclass -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GptOssConfig:
        model_type = raw.get("model_type")
        if model_type != "gpt_oss":
            archs = raw.get("architectures")
            raise ConfigError(
                f"config.json: model_type is {model_type!r} (architectures {archs}), not 'gpt_oss': "
                "gptoss-nemo only takes gpt-oss checkpoints (openai/gpt-oss-20b, openai/gpt-oss-120b or make-tiny)"
            )
        rope_raw = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
        if rope_raw.get("rope_type", "yarn") != "yarn":
            raise ConfigError(f"config.json: rope_scaling.rope_type is {rope_raw.get('rope_type')!r}, gpt-oss uses 'yarn'")
        rope = YarnRope(
            theta=float(rope_raw.get("rope_theta", raw.get("rope_theta", 150000.0))),
            factor=float(rope_raw.get("factor", 32.0)),
            original_max_position_embeddings=int(rope_raw.get("original_max_position_embeddings", 4096)),
            beta_fast=float(rope_raw.get("beta_fast", 32.0)),
            beta_slow=float(rope_raw.get("beta_slow", 1.0)),
            truncate=bool(rope_raw.get("truncate", True)),
        )
        quant = raw.get("quantization_config")
        if quant is not None and quant.get("quant_method") != "mxfp4":
            raise ConfigError(
                f"config.json: quantization_config.quant_method is {quant.get('quant_method')!r}; "
                "a gpt-oss checkpoint is either BF16 or MXFP4"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "quantized"}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        if "num_experts_per_tok" not in kwargs and "experts_per_token" in raw:
            kwargs["num_experts_per_tok"] = raw["experts_per_token"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        missing = sorted({"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok"} - set(kwargs))
        if missing:
            raise ConfigError(f"config.json: missing field(s) {', '.join(missing)}")
        if raw.get("tie_word_embeddings"):
            raise ConfigError("config.json: tie_word_embeddings is true; gpt-oss has a separate lm_head")
        return cls(rope=rope, quantized=quant is not None, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> GptOssConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; point at a Hugging Face gpt-oss checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); the checkpoint's config.json is damaged") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: holds a {type(raw).__name__}, not a config object; the file is damaged")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The openai/gpt-oss config.json layout."""
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "output_router_logits": False,
            "use_cache": True,
            "transformers_version": transformers_version(),
            "experts_per_token": self.num_experts_per_tok,
            "initial_context_length": self.rope.original_max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope.factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                "beta_fast": self.rope.beta_fast,
                "beta_slow": self.rope.beta_slow,
                "truncate": self.rope.truncate,
            },
        }
        for f in dataclasses.fields(self):
            if f.name not in ("rope", "quantized"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, list) else value
        if self.quantized:
            out["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": list(MXFP4_MODULES_NOT_CONVERTED),
            }
        return dict(sorted(out.items()))

    def save(self, directory: str | Path) -> Path:
        """Write config.json (the openai/gpt-oss layout) into `directory`."""
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes: Any) -> GptOssConfig:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = []
        return dataclasses.replace(self, **changes)
