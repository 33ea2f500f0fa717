"""Hugging Face BF16 gpt-oss tensors -> ModelOpt's Hugging Face NVFP4 layout for gpt-oss, one tensor at a time.

The layout ModelOpt's exporter writes for `GptOssExperts` (modelopt/torch/export/unified_export_hf.py,
quant_utils.py `maybe_transpose_expert_weight_dimensions`; TensorRT-LLM's `modeling_gpt_oss.load_nvfp4_weights`
reads it): the experts stay fused per projection in HF's [E, in, out] orientation, gate/up still interleaved on the
last axis, the E2M1 codes packed along the input axis (even input row in the low nibble):

    mlp.experts.gate_up_proj                 uint8          [E, H/2, 2I]
    mlp.experts.gate_up_proj_weight_scale    float8_e4m3fn  [E, H/16, 2I]
    mlp.experts.gate_up_proj_weight_scale_2  float32        []   amax / (6 * 448), one for all experts
    mlp.experts.gate_up_proj_input_scale     float32        []   activation amax / (6 * 448) (w4a4 only)
    mlp.experts.down_proj ...                the same with [E, I/2, H], [E, I/16, H]
Biases, router, attention, norms, embeddings and the output layer stay BF16.

The codes and scales are the ones ModelOpt's fake quant used in QAT (checkpoint/nvfp4.py), from the raw trained
weights, the quantizers' amax (shared by a layer's experts: quantize/formats.py) and, on the GPU, ModelOpt's own
fake quant of each expert, which the codes are made to reproduce exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from gptoss_nemo.checkpoint import nvfp4
from gptoss_nemo.checkpoint.hf_layout import layer_prefix
from gptoss_nemo import __version__

PROJECTIONS = {"gate_up_proj": "linear_fc1", "down_proj": "linear_fc2"}


def quantize_experts(w: torch.Tensor, amax: float, device: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, in, out] -> (packed [E, in/2, out], scales [E, in/16, out], global scale []), one expert at a time. On a
    GPU the codes and scales reproduce ModelOpt's fake quant of each expert exactly (its own kernel is run on the
    weight: checkpoint/nvfp4.py says why); without one, the codec alone (IEEE division)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fake = None
    if device == "cuda":
        from gptoss_nemo.quantize.modelopt_state import weight_quantizer

        fake = weight_quantizer("nvfp4", amax)  # nvfp4 and nvfp4_w4a4 quantize weights alike (formats.py)
    e, k, rows = w.shape
    packed = torch.empty(e, k // 2, rows, dtype=torch.uint8)
    scales = torch.empty(e, k // nvfp4.BLOCK, rows, dtype=torch.float8_e4m3fn)
    gs = None
    for i in range(e):
        wi = w[i].to(device).transpose(0, 1)  # [out, in]: blocks along the input axis
        with torch.no_grad():
            p, s, gs = nvfp4.quantize(wi, amax, fake=fake(wi.float()) if fake is not None else None)
        packed[i], scales[i] = p.transpose(0, 1).cpu(), s.transpose(0, 1).cpu()
    return packed, scales, gs.cpu()


def to_nvfp4(tensors: Iterable[tuple[str, torch.Tensor]], amax: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """`amax[(layer, "linear_fc1" | "linear_fc2")] = (weight amax, input amax or None)`."""
    for name, t in tensors:
        proj = next((p for p in PROJECTIONS if name.endswith(f"mlp.experts.{p}")), None)
        if proj is None:
            yield name, t
            continue
        layer = int(name.split(".")[2])
        w_amax, in_amax = amax[(layer, PROJECTIONS[proj])]
        packed, scales, gs = quantize_experts(t, w_amax)
        yield name, packed
        yield f"{name}_weight_scale", scales
        yield f"{name}_weight_scale_2", gs
        if in_amax is not None:
            yield f"{name}_input_scale", nvfp4.global_scale(in_amax)


def unquantized_modules(num_layers: int) -> list[str]:
    return ["lm_head", "model.embed_tokens", *(f"{layer_prefix(i)}mlp.router" for i in range(num_layers)),
            *(f"{layer_prefix(i)}self_attn*" for i in range(num_layers))]


def quantization_configs(num_layers: int, activations: bool) -> tuple[dict, dict]:
    """(config.json's `quantization_config`, hf_quant_config.json), as ModelOpt writes them for NVFP4 (weights and
    activations: quant_algo NVFP4) or weights only (W4A16_NVFP4)."""
    algo = "NVFP4" if activations else "W4A16_NVFP4"
    exclude = unquantized_modules(num_layers)
    producer = {"name": "gptoss-nemo", "version": __version__}
    fp4 = {"num_bits": 4, "type": "float", "group_size": nvfp4.BLOCK}
    group = {"weights": fp4, **({"input_activations": fp4} if activations else {}), "targets": ["Linear"]}
    config = {"config_groups": {"group_0": group}, "ignore": exclude, "quant_algo": algo, "producer": producer,
              "quant_method": "modelopt"}
    hf_quant = {"producer": producer, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None,
                                                      "group_size": nvfp4.BLOCK, "exclude_modules": exclude}}
    return config, hf_quant
