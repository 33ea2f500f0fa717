"""The tensors of a Hugging Face gpt-oss checkpoint: one table, and a check of a checkpoint against it.

Legend (HF names, HF shapes; E experts, H hidden, I expert width, Q = heads*head_dim, K = kv_heads*head_dim):
  model.embed_tokens.weight [V, H]          lm_head.weight [V, H]          model.norm.weight [H]
  model.layers.N.input_layernorm.weight [H]        model.layers.N.post_attention_layernorm.weight [H]
  model.layers.N.self_attn.{q,k,v}_proj.{weight [Q|K|K, H], bias}   o_proj.{weight [H, Q], bias [H]}
  model.layers.N.self_attn.sinks [heads]
  model.layers.N.mlp.router.{weight [E, H], bias [E]}
  experts, MXFP4 (rows = output features; gate/up rows interleaved: row 2j gate j, row 2j+1 up j):
    mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16] u8, gate_up_proj_scales [E, 2I, H/32] u8, gate_up_proj_bias [E, 2I]
    mlp.experts.down_proj_blocks [E, H, I/32, 16] u8,     down_proj_scales [E, H, I/32] u8,     down_proj_bias [E, H]
  experts, BF16 (input-major, as transformers' GptOssExperts holds them):
    mlp.experts.gate_up_proj [E, H, 2I], mlp.experts.down_proj [E, I, H], and the same biases.
Everything but the MXFP4 blocks/scales is BF16.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from gptoss_nemo.errors import CheckpointError
from gptoss_nemo.model.hf_config import GptOssConfig

Spec = tuple[tuple[int, ...], torch.dtype]
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}
INDEX_FILE = "model.safetensors.index.json"


def layer_prefix(n: int) -> str:
    return f"model.layers.{n}."


def expert_tensors(cfg: GptOssConfig, quantized: bool) -> dict[str, Spec]:
    """Expert tensors of one layer, names relative to `model.layers.N.mlp.experts.`."""
    e, h, i, bf16 = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, torch.bfloat16
    out: dict[str, Spec] = {"gate_up_proj_bias": ((e, 2 * i), bf16), "down_proj_bias": ((e, h), bf16)}
    if quantized:
        out["gate_up_proj_blocks"] = ((e, 2 * i, h // 32, 16), torch.uint8)
        out["gate_up_proj_scales"] = ((e, 2 * i, h // 32), torch.uint8)
        out["down_proj_blocks"] = ((e, h, i // 32, 16), torch.uint8)
        out["down_proj_scales"] = ((e, h, i // 32), torch.uint8)
    else:
        out["gate_up_proj"] = ((e, h, 2 * i), bf16)
        out["down_proj"] = ((e, i, h), bf16)
    return out


def layer_tensors(cfg: GptOssConfig, n: int, quantized: bool) -> dict[str, Spec]:
    h, bf16 = cfg.hidden_size, torch.bfloat16
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    p = layer_prefix(n)
    out: dict[str, Spec] = {
        p + "input_layernorm.weight": ((h,), bf16),
        p + "post_attention_layernorm.weight": ((h,), bf16),
        p + "self_attn.q_proj.weight": ((q, h), bf16),
        p + "self_attn.q_proj.bias": ((q,), bf16),
        p + "self_attn.k_proj.weight": ((kv, h), bf16),
        p + "self_attn.k_proj.bias": ((kv,), bf16),
        p + "self_attn.v_proj.weight": ((kv, h), bf16),
        p + "self_attn.v_proj.bias": ((kv,), bf16),
        p + "self_attn.o_proj.weight": ((h, q), bf16),
        p + "self_attn.o_proj.bias": ((h,), bf16),
        p + "self_attn.sinks": ((cfg.num_attention_heads,), bf16),
        p + "mlp.router.weight": ((cfg.num_local_experts, h), bf16),
        p + "mlp.router.bias": ((cfg.num_local_experts,), bf16),
    }
    out.update({p + "mlp.experts." + k: v for k, v in expert_tensors(cfg, quantized).items()})
    return out


def expected_tensors(cfg: GptOssConfig, quantized: bool | None = None) -> dict[str, Spec]:
    """Every tensor of the checkpoint, in the order a writer should emit them."""
    quantized = cfg.quantized if quantized is None else quantized
    v, h, bf16 = cfg.vocab_size, cfg.hidden_size, torch.bfloat16
    out: dict[str, Spec] = {"model.embed_tokens.weight": ((v, h), bf16)}
    for n in range(cfg.num_hidden_layers):
        out.update(layer_tensors(cfg, n, quantized))
    out["model.norm.weight"] = ((h,), bf16)
    out["lm_head.weight"] = ((v, h), bf16)
    return out


def checkpoint_bytes(cfg: GptOssConfig, quantized: bool) -> int:
    """The size of the checkpoint's tensors (what a writer needs free on its file system)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected_tensors(cfg, quantized).values())


def weight_map(ckpt_dir: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or from the directory's single file."""
    d = Path(ckpt_dir)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e}); the file is damaged: download or write "
                                  "the checkpoint again") from None
        if not isinstance(mapping, dict) or not mapping:
            raise CheckpointError(f"{index}: no weight_map; the index file is damaged")
        missing = sorted({f for f in mapping.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{d}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing")
        return mapping
    files = sorted(d.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(
            f"{d}: expected {INDEX_FILE} or exactly one .safetensors file, found {len(files)} .safetensors files"
        )
    with open_shard(files[0]) as f:
        return {name: files[0].name for name in f.keys()}


@contextlib.contextmanager
def open_shard(path: Path):
    """safetensors' safe_open, with a damaged file (a truncated download, a broken header) named in one line."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is damaged or incomplete (an "
                              "interrupted download?): download or write it again") from None
    with f:
        yield f


def read_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, on the CPU, in the index's order (for tests and small checkpoints)."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    names = weight_map(d)
    loaded: dict[str, torch.Tensor] = {}
    for fname in sorted(set(names.values())):
        loaded.update(load_file(d / fname))
    return {name: loaded[name] for name in names}


def read_specs(ckpt_dir: str | Path) -> dict[str, Spec]:
    """Shape and dtype of every tensor, from the safetensors headers (no tensor data is read)."""
    d = Path(ckpt_dir)
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map(d).items():
        by_file.setdefault(fname, []).append(name)
    specs: dict[str, Spec] = {}
    for fname, names in by_file.items():
        with open_shard(d / fname) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{d / fname}: {name} is in {INDEX_FILE} but not in the file")
                sl = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{fname}: {name} has unsupported dtype {sl.get_dtype()}")
                specs[name] = (tuple(sl.get_shape()), dtype)
    return specs


def check_tensors(cfg: GptOssConfig, specs: dict[str, Spec], where: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first tensor that does not fit `cfg` (missing, extra, shape, dtype)."""
    blocks = {k for k in specs if k.endswith("_blocks")}
    plain = {k for k in specs if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if blocks and plain:
        raise CheckpointError(
            f"{where}: mixes MXFP4 experts ({sorted(blocks)[0]}) and BF16 experts ({sorted(plain)[0]}); "
            "a checkpoint must be all MXFP4 or all BF16"
        )
    quantized = bool(blocks) if (blocks or plain) else cfg.quantized
    if quantized != cfg.quantized:
        state = "has" if cfg.quantized else "has no"
        raise CheckpointError(
            f"{where}: config.json {state} quantization_config but the experts are "
            f"{'MXFP4' if quantized else 'BF16'}; fix quantization_config in config.json"
        )
    expected = expected_tensors(cfg, quantized)
    for name, (shape, dtype) in expected.items():
        if name not in specs:
            raise CheckpointError(f"{where}: tensor {name} is missing")
        got_shape, got_dtype = specs[name]
        if tuple(got_shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(got_shape)}, config.json implies {shape}")
        if got_dtype != dtype:
            raise CheckpointError(f"{where}: {name} is {got_dtype}, expected {dtype}")
    extra = sorted(set(specs) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} unknown in all)")


def check_checkpoint(ckpt_dir: str | Path) -> GptOssConfig:
    """Validate a HF gpt-oss checkpoint directory from its config and headers; return its config."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    cfg = GptOssConfig.from_file(d)
    check_tensors(cfg, read_specs(d), where=str(d))
    return cfg


# Files beside the weights that travel with a model through import and export (those present are copied).
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja")


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the SIDE_FILES that `src` has into `dst`; return their names."""
    import shutil

    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
