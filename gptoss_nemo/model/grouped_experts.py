"""gpt-oss expert MLPs for all local experts at once on grouped GEMM (torch.nn.functional.grouped_mm), instead of
megatron's SequentialMLP, which loops over experts in Python and splits the tokens with a host synchronisation.

The arithmetic is megatron's for gpt-oss (model/megatron_config.py): fc1 [2I, H] per expert with gate in the first
half and up in the second (megatron's de-interleaved order), fc1 bias; act = g * sigmoid(1.702 g) with
g = min(gate, limit), times (clamp(up, -limit, limit) + 1); fc2 [H, I] and its bias; the router's probability
scales the expert's output, bias included (megatron's `moe_apply_probs_on_input=False`).

Tokens arrive permuted (grouped by local expert, megatron's dispatcher order) with the count per expert;
`grouped_mm` takes the groups' end offsets as int32 on the tokens' device, and the per-token biases come from
`repeat_interleave(..., output_size=T)`, so nothing here waits for the host. On Hopper and later the BF16 path is
CUTLASS's grouped GEMM; elsewhere (and on the CPU) torch's fallback loops over the groups.

Status: the function, tested against a per-expert loop on the CPU (values and gradients, empty experts included);
not yet a megatron experts module (wiring into the layer spec, the checkpoint keys SequentialMLP writes, and
ModelOpt's quantizers on the stacked weights are the rest of the work: issue 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ids(tokens_per_expert: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] local expert index of each permuted token (no host synchronisation)."""
    experts = torch.arange(tokens_per_expert.numel(), device=tokens_per_expert.device)
    return torch.repeat_interleave(experts, tokens_per_expert.to(experts.device), output_size=num_tokens)


def gpt_oss_activation(fc1_out: torch.Tensor, limit: float, alpha: float = 1.702) -> torch.Tensor:
    gate, up = fc1_out.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1.0)


def grouped_expert_mlp(x: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor,
                       fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                       fc2_bias: torch.Tensor, limit: float = 7.0) -> torch.Tensor:
    """x [T, H] permuted tokens, tokens_per_expert [E] (summing to T), probs [T]; fc1_weight [E, 2I, H],
    fc1_bias [E, 2I], fc2_weight [E, H, I], fc2_bias [E, H] -> [T, H]."""
    if fc1_weight.shape[0] != tokens_per_expert.numel():
        raise ValueError(f"{fc1_weight.shape[0]} experts' weights for {tokens_per_expert.numel()} token counts")
    offs = torch.cumsum(tokens_per_expert.to(device=x.device), dim=0).to(torch.int32)
    ids = expert_ids(tokens_per_expert.to(x.device), x.shape[0])
    h = F.grouped_mm(x, fc1_weight.transpose(-2, -1), offs=offs) + fc1_bias[ids]
    h = gpt_oss_activation(h, limit)
    out = F.grouped_mm(h, fc2_weight.transpose(-2, -1), offs=offs) + fc2_bias[ids]
    return out * probs.unsqueeze(-1).to(out.dtype)
