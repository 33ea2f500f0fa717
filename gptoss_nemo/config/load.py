"""Recipes: YAML files plus `a.b=c` overrides, turned into the typed dataclasses each stage defines.

OmegaConf reads the YAML, applies the overrides and resolves `${...}` interpolations; `build` then checks every key
against the dataclass fields and types, so a typo or a wrong type fails at once with the key's dotted path:
    recipe sft.yaml: train.stepz is not a field of TrainConfig (fields: steps, global_batch_size, ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from gptoss_nemo.errors import ConfigError

# Keys that moved, by (dataclass, old field): where they went.
MOVED = {("TrainConfig", "kernels"): "model.impl (fused | te | reference | auto), one setting for every stage"}


def load_recipe(cls, path: str | Path, overrides: list[str] = ()):
    """`cls` filled from the YAML at `path` with `overrides` ("a.b=c") applied on top."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a recipe file; give a YAML file such as recipes/tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    from omegaconf import DictConfig

    data = _read(path)
    if not isinstance(data, DictConfig):
        raise ConfigError(f"recipe {path}: the top level is a list, not a mapping of sections (data:, train:, "
                          "...); write it as section: / key: value lines")
    merged = _merge(path, data, overrides)
    return build(cls, merged, f"recipe {path.name}: ")


def _read(path: Path):
    """The YAML file as OmegaConf reads it (its float syntax, `${...}` kept for later)."""
    import yaml
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"recipe {path}: YAML syntax error{at}: {getattr(e, 'problem', None) or e}; fix the "
                          "file there") from None
    except OSError as e:  # OmegaConf's "Invalid loaded object type: int" for a file holding one value
        raise ConfigError(f"recipe {path}: the top level is not a mapping of sections ({e}); write it as "
                          "section: / key: value lines") from None
    return conf


def _merge(path: Path, data, overrides: list[str]) -> dict:
    """The recipe with the overrides on top, `${...}` resolved."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parsed = []  # one by one, so that a malformed value is named
    for o in overrides:
        if "=" not in o or not o.split("=", 1)[0]:
            raise ConfigError(f"override {o!r} is not of the form section.key=value")
        try:
            parsed.append(OmegaConf.from_dotlist([o]))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {o!r}: its value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              "quote it, e.g. 'section.key=\"...\"', or write a list as [a, b]") from None
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"override {o!r}: {str(e).splitlines()[0]}") from None
    try:
        conf = OmegaConf.merge(data, *parsed)
        return OmegaConf.to_container(conf, resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise ConfigError(f"recipe {path}: {str(e).splitlines()[0]}") from None


def qualify(message: str, stage: str, sections: tuple[str, ...] = ("train", "optimizer", "quant")) -> str:
    """A stage section's message with its keys named as the pipeline recipe spells them (`train.steps` ->
    `qat.train.steps`)."""
    return re.sub(rf"(?<![\w.])({'|'.join(sections)})\.", rf"{stage}.\1.", message)


@contextlib.contextmanager
def stage_keys(stage: str | None) -> Iterator[None]:
    """Checks of a stage's sections, reported under the stage's key in the pipeline recipe (None: as they are)."""
    try:
        yield
    except ConfigError as e:
        if stage is None:
            raise
        raise ConfigError(qualify(str(e), stage)) from None


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
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a nested section's own checks name it by its short key: train.steps -> sft.train.steps
        parent, _, section = _path.rstrip(".").rpartition(".")
        if not parent:
            raise
        raise ConfigError(qualify(str(e), parent, (section,))) from None


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
            raise ConfigError(f"{where}{dotted} must be a list, got {value!r}; write it as a YAML list: "
                              f"{dotted}=[{value}] (or one '- ...' line per entry)")
        return origin(_value(args[0], v, where, f"{dotted}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}{dotted} must be {tp.__name__}, got {value!r}")
    if tp is str and _CONTROL.search(value):
        raise ConfigError(f"{where}{dotted}={value!r} has a control character (newline, tab, ...); remove it")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
