"""Per-GPU memory estimate for BF16 training of gpt-oss under a TP x EP x PP layout (ETP = 1).

Parameters a rank holds (the busiest pipeline stage): its layers' attention split over TP (o_proj bias, norms and
router replicated), its EP share of the experts (whole experts: ETP = 1), the embedding rows (first stage) and the
output rows + final norm (last stage), each vocabulary matrix split over TP.

Bytes per held parameter: 2 (BF16 weight) + 4 (FP32 gradient buffer, grad_reduce_in_fp32) + 12 (FP32 main weight,
Adam m and v) divided over the data-parallel group that replicates it (the distributed optimizer): world/(TP*PP)
for dense parameters, world/(EP*PP) for experts. Without Transformer Engine or Apex (megatron's local spec), megatron
steps with torch's foreach AdamW, whose update holds an FP32 temporary the size of the rank's optimizer shard (the
square roots of v): 4 more bytes per shard parameter at the optimizer step (TE's fused Adam has none).

Activations kept for backward, per micro-batch and layer, BF16, no recomputation, T = seq_length x micro_batch
tokens per rank (sequence parallelism, with TE, divides the T*H terms by TP):
    attention  norm out + QKV out + attention out + o_proj in + residual:  2T(H + (Q + 2K)/TP + 2Q/TP + H)
               + scores and probabilities with megatron's reference local attention: 2 * 2 * b * heads/TP * s^2
                 (none with TE's fused attention or the fused local kernels, model.impl=fused)
    MoE        norm out + router logits (FP32) + k routed copies in, fc1 out (2I), activation (I), fc2 out, unpermuted:
               2TH + 4TE + 2kT(H + 2I + I + H + H)
While a layer runs, megatron's reference attention also holds its FP32 scores and softmax output (8 bytes per
score, one layer at a time). The optimizer's FP32 temporary exists only after the backward, when the activations
are gone: the peak is weights + gradients + optimizer state + the larger of (activations + QAT / stacked expert
copies) and that temporary.
Output logits (last stage): 6 T V / TP, the BF16 logits and the FP32 copy megatron's vocab-parallel cross entropy
makes of them (it keeps that copy as the softmax for backward), alive together (measured on the tiny model, whose
peak they dominate: tests/gpu/RESULTS.md); with the fused kernels' BF16-reading loss (TP 1), 8 T V (measured on
two gpt-oss-20b-shaped layers: 1.5 GiB more at 4096 tokens, 3.1 at 8192, than megatron's loss). A 1F1B pipeline
keeps PP micro-batches in flight on the first stage.
QAT adds the fake-quantized copy of every expert weight the rank holds (BF16, kept by autograd for the backward of
each expert matmul): 2 bytes per held expert parameter. The fused local kernels' grouped GEMM keeps one stacked
copy of each layer's expert weights the same way (the fake-quantized ones under QAT): the same 2 bytes, with or
without QAT.
This is a planning estimate; tests/gpu checks it against measured peak memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.parallel.layout import ParallelLayout

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class RankParams:
    dense: int
    expert: int


def rank_params(cfg: GptOssConfig, layout: ParallelLayout, stage: int) -> RankParams:
    h, tp, pc = cfg.hidden_size, layout.tp, count_parameters(cfg)
    attention = (pc.attention_per_layer - h) // tp + h  # all split over TP but the o_proj bias
    layer_dense = attention + cfg.num_local_experts * (h + 1) + 2 * h  # + router w+b, two norms
    layers = cfg.num_hidden_layers // layout.pp
    dense = layers * layer_dense
    if stage == 0:
        dense += cfg.vocab_size * h // tp
    if stage == layout.pp - 1:
        dense += cfg.vocab_size * h // tp + h
    expert = layers * (cfg.num_local_experts // layout.ep) * pc.per_expert
    return RankParams(dense=dense, expert=expert)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    quantization: float = 0.0  # QAT: the fake-quantized expert weights
    optimizer_step: float = 0.0  # torch AdamW's FP32 temporary (local spec)

    @property
    def total(self) -> float:
        """The peak: activations live through forward and backward, the optimizer's temporary after them."""
        return (self.weights + self.gradients + self.optimizer
                + max(self.activations + self.quantization, self.optimizer_step))

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in {**asdict(self), "total": self.total}.items()}


def activation_bytes(cfg: GptOssConfig, layout: ParallelLayout, stage: int, seq_length: int, micro_batch: int,
                     impl: str) -> float:
    te, fused = impl == "te", impl == "fused"
    h, d, i, tp = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, layout.tp
    q, kv, k = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_experts_per_tok
    t = seq_length * micro_batch
    sp = tp if (te and tp > 1) else 1
    attention = 2 * t * (h / sp + (q + 2 * kv) / tp + 2 * q / tp + h / sp)
    scores = micro_batch * (cfg.num_attention_heads / tp) * seq_length**2
    if not te and not fused:
        attention += 2 * 2 * scores
    moe = 2 * t * h / sp + 4 * t * cfg.num_local_experts + 2 * k * t * (h + 2 * i + i + h + h)
    per_micro = (cfg.num_hidden_layers // layout.pp) * (attention + moe)
    if stage == layout.pp - 1:  # the fused kernels' loss (TP 1) keeps 8 bytes per logit at its peak (measured)
        per_micro += (8 if fused and tp == 1 else 6) * t * cfg.vocab_size / tp
    in_flight = layout.pp - stage  # 1F1B: the first stage holds PP micro-batches
    transient = 0.0 if (te or fused) else 8 * scores  # one layer's FP32 scores and softmax, while it runs
    return per_micro * in_flight + transient


def estimate(cfg: GptOssConfig, layout: ParallelLayout, world_size: int, seq_length: int, micro_batch: int,
             impl: str = "fused", qat: bool = False) -> tuple[MemoryEstimate, int]:
    """(the busiest stage's per-GPU estimate, that stage) under implementation `impl` (fused, te, reference);
    layout validity is the caller's check."""
    te, fused = impl == "te", impl == "fused"
    dp, edp = world_size // (layout.tp * layout.pp), world_size // (layout.ep * layout.pp)
    best = None
    for stage in range(layout.pp):
        p = rank_params(cfg, layout, stage)
        held = p.dense + p.expert
        shard = p.dense / dp + p.expert / edp  # what this rank's distributed-optimizer shard holds
        m = MemoryEstimate(
            weights=2 * held,
            gradients=4 * held,
            optimizer=12 * shard,
            activations=activation_bytes(cfg, layout, stage, seq_length, micro_batch, impl),
            quantization=2 * p.expert if (qat or fused) else 0.0,
            optimizer_step=0.0 if te else 4 * shard,
        )
        if best is None or m.total > best[0].total:
            best = (m, stage)
    return best


def longest_fitting(cfg: GptOssConfig, layout: ParallelLayout, world_size: int, micro_batch: int, budget: float,
                    impl: str = "fused", qat: bool = False, step: int = 1024) -> int | None:
    """The longest multiple of `step` tokens (up to the model's positions) whose estimate fits in `budget` bytes;
    None when not even `step` does. The estimate grows with the sequence length, so a bisection finds it."""
    def fits(seq: int) -> bool:
        return estimate(cfg, layout, world_size, seq, micro_batch, impl=impl, qat=qat)[0].total <= budget

    lo, hi = 0, cfg.max_position_embeddings // step  # multiples of step: lo fits (0 = none), hi + 1 does not
    if fits(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step or None
