"""Quantization error of the expert weights, per layer: how far q(w) (what the fake-quant forward computes with)
is from w (what the optimizer trains).

    mean_rel, max_rel   mean and max over the layer's expert weight elements (w != 0) of |w - q(w)| / |w|
    l2_rel              ||w - q(w)|| / ||w|| over the layer's expert weights

Logged when QAT / PTQ quantizes the model ("before") and at the end of QAT ("after"), in RUN/quant_error.json.
"""

from __future__ import annotations

import torch

# per layer: [sum of |w-q|/|w|, count of w != 0, sum (w-q)^2, sum w^2] (summed) and max |w-q|/|w| (maxed)
_SUMS = 4


def element_stats(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [4], max []) of one weight; see _SUMS."""
    w, q = w.float(), q.float()
    nz = w != 0
    rel = (w - q).abs()[nz] / w.abs()[nz]
    sums = torch.stack([rel.sum(), nz.sum().float(), ((w - q) ** 2).sum(), (w ** 2).sum()])
    return sums, rel.max() if rel.numel() else torch.zeros((), device=w.device)


def summarize(sums: torch.Tensor, maxes: torch.Tensor) -> list[dict]:
    """[layers, 4] sums and [layers] maxes -> one dict per layer."""
    return [{"layer": i, "mean_rel": (s[0] / s[1].clamp(min=1)).item(), "max_rel": m.item(),
             "l2_rel": (s[2].sqrt() / s[3].sqrt().clamp(min=1e-30)).item()}
            for i, (s, m) in enumerate(zip(sums, maxes))]


@torch.no_grad()
def expert_quant_error(gpt: torch.nn.Module, num_layers: int) -> list[dict]:
    """Collective over the world: per global layer, the error of the quantized expert weights. Each expert is
    counted once (tensor-parallel rank 0 and expert-data-parallel rank 0 of its owner contribute)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gptoss_nemo.quantize.modelopt_state import fake_quant, global_layer

    device = torch.device("cuda", torch.cuda.current_device())
    sums = torch.zeros(num_layers, _SUMS, device=device, dtype=torch.float64)
    maxes = torch.zeros(num_layers, device=device)
    counts = ps.get_tensor_model_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
    params = dict(gpt.named_parameters())
    for name, q in (fake_quant(gpt) if counts else {}).items():
        layer = global_layer(gpt, name)
        s, m = element_stats(params[name], q)
        sums[layer] += s.double()
        maxes[layer] = torch.maximum(maxes[layer], m)
    dist.all_reduce(sums)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    return summarize(sums, maxes)
