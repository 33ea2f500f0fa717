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


class RoutedTokenCounter:
    """Counts, with forward hooks on megatron's routers, the tokens each expert of each local layer is routed in
    training forwards (evaluation forwards are left out). Under activation recompute a layer's forward runs twice,
    first without grad, then again in the backward with it: only the latter counts."""

    def __init__(self, gpt_model, num_experts: int):
        layers = gpt_model.decoder.layers
        self.counts = torch.zeros(len(layers), num_experts, device="cuda")
        self.first_layer = layers[0].layer_number - 1 if len(layers) else 0
        self.sequence_parallel = bool(gpt_model.config.sequence_parallel)
        for i, layer in enumerate(layers):
            layer.mlp.router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # a recomputed forward runs again with grad
                routing_map = output[1]  # [tokens, experts] booleans: the top-k choice of each token
                self.counts[i] += routing_map.sum(dim=0).float()
        return hook

    def take(self) -> torch.Tensor:
        """Collective. [layers of the whole model, experts] on every rank, summed over the ranks that route
        different tokens (data-parallel replicas; TP ranks under sequence parallelism); then reset."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        counts = self.counts.clone()
        dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        if self.sequence_parallel:
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        pieces: list = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(pieces, (self.first_layer, counts.cpu()), group=ps.get_pipeline_model_parallel_group())
        self.counts.zero_()
        return torch.cat([c for _, c in sorted(pieces, key=lambda p: p[0])])
