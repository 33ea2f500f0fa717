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

`GroupedGemmExperts` is the megatron experts module built on it (the local spec's experts with model.impl=fused,
model/build.py). It is megatron's `SequentialMLP` with another forward: the same per-expert `linear_fc1` /
`linear_fc2` submodules, so the same parameter names, checkpoint keys (dist checkpoints move freely between the two)
and, under ModelOpt, the same per-expert weight quantizers, which the forward applies to each expert's weight before
stacking them (QAT trains through every expert's fake quant, as with SequentialMLP). Formats that also quantize the
experts' input activations (nvfp4_w4a4) keep SequentialMLP's per-expert loop: their input quantizers need each
expert's tokens apart. Expert tensor parallelism must be 1 (gptoss-nemo's layouts: parallel/layout.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.cuda_compile import compiled_on_cuda


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
    h = F.grouped_mm(x, fc1_weight.transpose(-2, -1), offs=offs)
    h = _bias_activation(h, GatherRows.apply(fc1_bias, ids), limit)
    out = F.grouped_mm(h, fc2_weight.transpose(-2, -1), offs=offs)
    return _bias_scale(out, GatherRows.apply(fc2_bias, ids), probs)


class GatherRows(torch.autograd.Function):
    """bias[ids] -> [T, N]; the backward sums each expert's rows as one small GEMM, one_hot(ids)^T @ grad (FP32
    accumulation), instead of indexing's backward (a sort and atomics over T rows: milliseconds per layer)."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_experts = bias.shape[0]
        return bias[ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        one_hot = F.one_hot(ids, ctx.num_experts).to(grad.dtype)  # [T, E]
        return (one_hot.t() @ grad), None


# On the GPU each is one fused elementwise kernel each way (the token count left dynamic).
@compiled_on_cuda(dynamic=True)
def _bias_activation(h: torch.Tensor, bias: torch.Tensor, limit: float) -> torch.Tensor:
    return gpt_oss_activation(h + bias, limit)


@compiled_on_cuda(dynamic=True)
def _bias_scale(out: torch.Tensor, bias: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(out + bias) * prob, the product in FP32 (probs are FP32, as megatron's router gives them)."""
    return ((out + bias).float() * probs.unsqueeze(-1).float()).to(out.dtype)


def _quantized_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight as the expert's forward sees it: through ModelOpt's weight quantizer when there is one."""
    quantizer = getattr(linear, "weight_quantizer", None)
    return linear.weight if quantizer is None else quantizer(linear.weight)


def straight_through(quantizer) -> bool:
    """Whether the weight's gradient passes through `quantizer` unchanged (what the weight cache assumes): no
    quantizer, or ModelOpt's pass-through fake quant with nothing of its own to train (not LSQ: its learned scales
    would lose their gradients; not a chain of quantizers, which has no such flag)."""
    if quantizer is None:
        return True
    return (getattr(quantizer, "_pass_through_bwd", False) and not getattr(quantizer, "_lsq", False)
            and not any(p.requires_grad for p in quantizer.parameters()))


def _input_quantized(experts) -> bool:
    for expert in experts:
        for linear in (expert.linear_fc1, expert.linear_fc2):
            q = getattr(linear, "input_quantizer", None)
            if q is not None and q.is_enabled:
                return True
    return False


class GroupedGemmExperts(SequentialMLP):
    """megatron's SequentialMLP (same submodules, names, checkpoint) with all local experts in two grouped GEMMs."""

    def __init__(self, num_local_experts: int, config, submodules, pg_collection=None, name: str | None = None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, name=name)
        if self.tp_group.size() != 1:
            raise ConfigError(f"grouped-GEMM experts need expert tensor parallelism 1, got {self.tp_group.size()}")
        if config.moe_apply_probs_on_input or not config.gated_linear_unit or not config.add_bias_linear:
            raise ConfigError("grouped-GEMM experts implement gpt-oss's experts: gated, with biases, the routing "
                              "probability applied to the output")
        if config.fp8 or config.fp4:
            raise ConfigError("grouped-GEMM experts run in BF16 (quantization goes through ModelOpt's fake quant)")
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        if (config.activation_func is not quick_gelu or config.glu_linear_offset != 1.0
                or config.activation_func_clamp_value is None):
            raise ConfigError("grouped-GEMM experts compute gpt-oss's activation (quick_gelu, glu_linear_offset 1, a "
                              "clamp); this config asks for another: use model.impl=reference")
        self.limit = float(config.activation_func_clamp_value)
        self._cache: dict | None = None  # see expert_weight_cache

    def _stacked_weight(self, which: str) -> torch.Tensor:
        """[E, out, in]: every local expert's weight of `which`, through its weight quantizer if it has one."""
        linears = [getattr(e, which) for e in self.local_experts]
        cache = self._cache
        if cache is not None and which not in cache and all(
                straight_through(getattr(lin, "weight_quantizer", None)) for lin in linears):
            with torch.no_grad():  # once per global batch; later micro-batches skip these checks
                cache[which] = torch.stack([_quantized_weight(lin) for lin in linears])
        if cache is not None and which in cache:
            return _StraightThrough.apply(cache[which], *[lin.weight for lin in linears])
        return torch.stack([_quantized_weight(lin) for lin in linears])

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if _input_quantized(self.local_experts):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        experts = self.local_experts
        fc1_w, fc2_w = self._stacked_weight("linear_fc1"), self._stacked_weight("linear_fc2")
        fc1_b = torch.stack([e.linear_fc1.bias for e in experts])
        fc2_b = torch.stack([e.linear_fc2.bias for e in experts])
        out = grouped_expert_mlp(permuted_local_hidden_states, tokens_per_expert, permuted_probs,
                                 fc1_w, fc1_b, fc2_w, fc2_b, self.limit)
        return out, None


class _StraightThrough(torch.autograd.Function):
    """The stacked weights computed once (under no_grad) stand in for stack(q(w_e)); the gradient goes to each
    expert's weight unchanged, which is what autograd computes without the cache: stacking passes gradients
    through, and so does ModelOpt's weight fake quant when its backward is pass-through (its default, and always
    for the MX formats: dynamic block scales clip nothing)."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *grad.unbind(0))


@contextlib.contextmanager
def expert_weight_cache(model: torch.nn.Module):
    """Within this context each `GroupedGemmExperts` of `model` stacks (and fake-quantizes) its experts' weights
    once, at first use, and reuses them in every later micro-batch; gradients reach the weights as without it.
    Wrap one global batch (forward and backward of all its micro-batches), inside which the weights do not change:
    QAT then quantizes each weight once per optimizer step instead of once per micro-batch."""
    experts = [m for m in model.modules() if isinstance(m, GroupedGemmExperts)]
    for m in experts:
        m._cache = {}
    try:
        yield
    finally:
        for m in experts:
            m._cache = None


def register_with_modelopt() -> None:
    """Give `GroupedGemmExperts` ModelOpt's quantized-SequentialMLP behaviour (parallel state on the experts'
    linears, amax sync, singleton expert shards in the checkpoint). ModelOpt matches subclasses only when they keep
    the registered class's forward, which this one replaces."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.plugins.megatron import _MegatronSequentialMLP

    if GroupedGemmExperts not in QuantModuleRegistry:
        QuantModuleRegistry.register({GroupedGemmExperts: "gptoss_nemo_GroupedGemmExperts"})(_MegatronSequentialMLP)
