"""Per-expert load: how many routed tokens each expert of each layer received, and what to warn about.

`tokens` is [layers, experts] counts over a logging window (megatron's routing map summed per layer). Balanced
routing gives every expert top_k / num_experts of the routed assignments; max/mean = 1. A collapsing router shows
unused experts (0 tokens) and a rising max/mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LayerLoad:
    layer: int
    max_over_mean: float
    max_share: float  # the busiest expert's share of the layer's routed assignments
    unused: tuple[int, ...]  # experts that received no token


def summarize(tokens: torch.Tensor) -> list[LayerLoad]:
    tokens = tokens.double()
    out = []
    for layer, row in enumerate(tokens):
        total = row.sum().item()
        mean = total / row.numel() if row.numel() else 0.0
        out.append(LayerLoad(
            layer=layer,
            max_over_mean=row.max().item() / mean if mean else 0.0,
            max_share=row.max().item() / total if total else 0.0,
            unused=tuple(int(x) for x in torch.nonzero(row == 0).flatten()),
        ))
    return out


def warnings(loads: list[LayerLoad], max_share: float) -> list[str]:
    """One line per layer with an unused expert or an expert above `max_share` of the routed assignments."""
    lines = []
    for ld in loads:
        if ld.unused:
            lines.append(f"layer {ld.layer}: experts {list(ld.unused)} received no tokens")
        if ld.max_share > max_share:
            lines.append(f"layer {ld.layer}: one expert took {ld.max_share:.1%} of the routed tokens "
                         f"(> train.expert_max_share={max_share:.0%})")
    return lines
