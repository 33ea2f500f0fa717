"""Recipes: YAML files plus `a.b=c` overrides, turned into the typed dataclasses each stage defines.

OmegaConf reads the YAML, applies the overrides and resolves `${...}` interpolations; `build` then checks every key
against the dataclass fields and types, so a typo or a wrong type fails at once with the key's dotted path:
    recipe sft.yaml: train.stepz is not a field of TrainConfig (fields: steps, global_batch_size, ...)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from gptoss_nemo.errors import ConfigError

# Keys that moved, by (dataclass, old field): where they went.
MOVED = {("TrainConfig", "kernels"): "model.impl (fused | te | reference | auto), one setting for every stage"}


def load_recipe(cls, path: str | Path, overrides: list[str] = ()):
    """`cls` filled from the YAML at `path` with `overrides` ("a.b=c") applied on top."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    for o in overrides:
        if "=" not in o or not o.split("=", 1)[0]:
            raise ConfigError(f"override {o!r} is not of the form section.key=value")
    try:
        conf = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(conf, resolve=True)
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"recipe {path}: {str(e).splitlines()[0]}") from None
    return build(cls, data or {}, f"recipe {path.name}: ")


def build(cls, data, where: str = "", _path: str = ""):
    """An instance of dataclass `cls` from plain data, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{_path.rstrip('.') or 'the recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if (cls.__name__, key) in MOVED:
            raise ConfigError(f"{where}{_path}{key} was replaced by {MOVED[cls.__name__, key]}")
        if key not in fields:
            raise ConfigError(f"{where}{_path}{key} is not a field of {cls.__name__} (fields: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{_path}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}{dotted} is required")
            continue
        kwargs[name] = _value(hints[name], data[name], where, dotted)
    return cls(**kwargs)


def _value(tp, value, where: str, dotted: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, where, dotted)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, dotted + ".")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}{dotted}={value!r}; use one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}{dotted} must be a list, got {value!r}")
        return origin(_value(args[0], v, where, f"{dotted}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}{dotted} must be {tp.__name__}, got {value!r}")
    return value
