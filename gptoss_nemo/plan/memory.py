"""Per-GPU memory estimate for BF16 training of gpt-oss under a TP x EP x PP layout (ETP = 1).

Parameters a rank holds (the busiest pipeline stage): its layers' attention split over TP (o_proj bias, norms and
router replicated), its EP share of the experts (whole experts: ETP = 1), the embedding rows (first stage) and the
output rows + final norm (last stage), each vocabulary matrix split over TP.

Bytes per held parameter: 2 (BF16 weight) + 4 (FP32 gradient buffer, grad_reduce_in_fp32) + 12 (FP32 main weight,
Adam m and v) divided over the data-parallel group that replicates it (the distributed optimizer): world/(TP*PP)
for dense parameters, world/(EP*PP) for experts. Where neither Transformer Engine nor Apex is installed
(`fused_adam=False`), megatron steps with torch's foreach AdamW, whose update holds an FP32 temporary the size of
the rank's optimizer shard (the square roots of v): 4 more bytes per shard parameter at the optimizer step (TE's
fused Adam, which megatron takes wherever TE imports, whatever model.impl, has none).

Activations kept for backward, per micro-batch and layer, BF16, no recomputation, T = seq_length x micro_batch / CP
tokens per rank (context parallelism splits every sequence over CP ranks; sequence parallelism, with TE, divides the
T*H terms by TP; TE's all-to-all CP attention holds heads / CP heads for the whole sequence, the same size):
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
Memory savers (train/memory_savers.py, the same object the training runs with):
    gradients  2 bytes per held parameter with optimizer.main_grads_dtype=bf16
    optimizer  precision-aware: 4 (FP32 master weight) or 2 (FP16) + 2 or 4 each for m and v per shard parameter,
               and no FP32 update temporary (TE's FusedAdam); CPU offload of a fraction f:
               12 (1 - f) on the GPU
    recompute  full: a recomputed layer keeps its input (2TH, divided by TP under sequence parallelism); selective
               moe: the MoE block keeps its input (the pre-MLP norm's output) only; moe_act: no activation output
               (2kTI); layernorm: no norm outputs (2 x 2TH); core_attn: no scores (reference) or no attention
               output (2TQ/TP, fused and TE). While the backward runs one recomputed unit (a layer, or a layer's
               MoE block) holds its full activations again: once, whatever the micro-batches in flight.
This is a planning estimate; tests/gpu checks it against measured peak memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.parallel.layout import ParallelLayout
from gptoss_nemo.train.memory_savers import MemorySavers

NO_SAVERS = MemorySavers()  # frozen: the plain run's settings

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
    optimizer_step: float = 0.0  # torch AdamW's FP32 temporary (no TE or Apex installed)

    @property
    def total(self) -> float:
        """The peak: activations live through forward and backward, the optimizer's temporary after them."""
        return (self.weights + self.gradients + self.optimizer
                + max(self.activations + self.quantization, self.optimizer_step))

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in {**asdict(self), "total": self.total}.items()}


@dataclass(frozen=True, slots=True)
class LayerActivations:
    """Bytes one layer keeps for the backward per micro-batch, by part."""

    norms: float  # the two RMSNorm outputs
    attention: float  # the rest of the attention block (QKV, attention output, o_proj input, residual, scores)
    moe_input: float  # what a recomputed MoE block keeps: its input
    moe: float  # the rest of the MoE block
    moe_act: float  # of which the experts' activation output
    core_attn: float  # what recomputing the core attention drops
    layer_input: float  # what a fully recomputed layer keeps
    running: float  # megatron's reference attention: one layer's FP32 scores and softmax, while that layer runs

    @property
    def full(self) -> float:
        return self.norms + self.attention + self.moe_input + self.moe


def layer_activations(cfg: GptOssConfig, layout: ParallelLayout, seq_length: int, micro_batch: int,
                      impl: str) -> LayerActivations:
    te, fused = impl == "te", impl == "fused"
    h, d, i, tp = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, layout.tp
    q, kv, k = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_experts_per_tok
    t = seq_length * micro_batch / layout.cp  # context parallelism: each rank holds 1/cp of every sequence
    sp = tp if (te and tp > 1) else 1
    scores = 2 * 2 * micro_batch * (cfg.num_attention_heads / tp) * seq_length**2 if not (te or fused) else 0.0
    return LayerActivations(
        norms=2 * 2 * t * h / sp,
        attention=2 * t * ((q + 2 * kv) / tp + 2 * q / tp + h / sp) + scores,
        moe_input=0.0,  # the pre-MLP norm's output, counted in norms (without layernorm recompute)
        moe=4 * t * cfg.num_local_experts + 2 * k * t * (h + 2 * i + i + h + h),
        moe_act=2 * k * t * i,
        core_attn=scores if scores else 2 * t * q / tp,
        layer_input=2 * t * h / sp,
        running=2 * scores,  # 8 bytes per score
    )


def _kept_and_transient(a: LayerActivations, savers: MemorySavers, layers: int) -> tuple[float, float]:
    """(bytes the stage's layers keep per micro-batch, bytes one recomputed unit adds while the backward runs)."""
    if savers.recompute == "full":
        n = layers if savers.recompute_layers is None else min(savers.recompute_layers, layers)
        return n * a.layer_input + (layers - n) * a.full, a.full
    if savers.recompute != "selective":
        return layers * a.full, 0.0
    mods = set(savers.recompute_modules)
    kept, transient = a.full, 0.0
    if "layernorm" in mods:
        kept -= a.norms
        transient = max(transient, a.norms / 2)
        if "moe" in mods:  # the MoE block's input is the recomputed norm's output: kept for the MoE checkpoint
            kept += a.norms / 2
    if "moe" in mods:
        kept -= a.moe
        transient = max(transient, a.moe)
    elif "moe_act" in mods:
        kept -= a.moe_act
        transient = max(transient, a.moe_act)
    if "core_attn" in mods:
        kept -= a.core_attn
        transient = max(transient, a.core_attn)
    return layers * kept, transient


def activation_bytes(cfg: GptOssConfig, layout: ParallelLayout, stage: int, seq_length: int, micro_batch: int,
                     impl: str, savers: MemorySavers = NO_SAVERS) -> float:
    a = layer_activations(cfg, layout, seq_length, micro_batch, impl)
    per_micro, recomputing = _kept_and_transient(a, savers, cfg.num_hidden_layers // layout.pp)
    if stage == layout.pp - 1:  # the fused kernels' loss (TP 1) keeps 8 bytes per logit at its peak (measured)
        logit_bytes = 8 if impl == "fused" and layout.tp == 1 else 6
        per_micro += logit_bytes * seq_length * micro_batch / layout.cp * cfg.vocab_size / layout.tp
    in_flight = layout.pp - stage  # 1F1B: the first stage holds PP micro-batches
    return per_micro * in_flight + max(a.running, recomputing)


def estimate(cfg: GptOssConfig, layout: ParallelLayout, world_size: int, seq_length: int, micro_batch: int,
             impl: str = "fused", qat: bool = False, savers: MemorySavers = NO_SAVERS,
             fused_adam: bool = True) -> tuple[MemoryEstimate, int]:
    """(the busiest stage's per-GPU estimate, that stage) under implementation `impl` (fused, te, reference) and
    the recipe's memory savers; fused_adam: whether TE or Apex is installed where it runs (the NeMo container: yes;
    `fused_adam_here()` for this machine). Layout validity is the caller's check."""
    fused = impl == "fused"
    dp, edp = world_size // (layout.tp * layout.pp), world_size // (layout.ep * layout.pp)
    best = None
    for stage in range(layout.pp):
        p = rank_params(cfg, layout, stage)
        held = p.dense + p.expert
        shard = p.dense / dp + p.expert / edp  # what this rank's distributed-optimizer shard holds
        m = MemoryEstimate(
            weights=2 * held,
            gradients=savers.grad_bytes * held,
            optimizer=savers.optimizer_bytes() * shard,
            activations=activation_bytes(cfg, layout, stage, seq_length, micro_batch, impl, savers),
            quantization=2 * p.expert if (qat or fused) else 0.0,
            optimizer_step=0.0 if (fused_adam or savers.precision_aware) else 4 * shard,
        )
        if best is None or m.total > best[0].total:
            best = (m, stage)
    return best


def fused_adam_here() -> bool:
    """Whether megatron steps with a fused Adam here (TE's or Apex's) rather than torch's foreach AdamW."""
    import importlib.util

    from gptoss_nemo.model.impl import te_version

    return te_version() is not None or importlib.util.find_spec("apex") is not None


def longest_fitting(cfg: GptOssConfig, layout: ParallelLayout, world_size: int, micro_batch: int, budget: float,
                    impl: str = "fused", qat: bool = False, step: int = 1024,
                    savers: MemorySavers = NO_SAVERS) -> int | None:
    """The longest multiple of `step` tokens (up to the model's positions) whose estimate fits in `budget` bytes;
    None when not even `step` does. The estimate grows with the sequence length, so a bisection finds it."""
    def fits(seq: int) -> bool:
        return estimate(cfg, layout, world_size, seq, micro_batch, impl=impl, qat=qat, savers=savers)[0].total <= budget

    lo, hi = 0, cfg.max_position_embeddings // step  # multiples of step: lo fits (0 = none), hi + 1 does not
    if fits(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step or None


LADDER = (  # what to turn on next, in the order that costs least per step (benchmarks/RESULTS.md)
    (["train.recompute=full"], dict(recompute="full", recompute_modules=(), recompute_layers=None)),
    (["optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16"],
     dict(exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16", cpu_offload_fraction=0.0)),
    (["optimizer.main_grads_dtype=bf16"], dict(main_grads_dtype="bf16")),
)


def further(cfg: GptOssConfig, layout: ParallelLayout, world_size: int, micro_batch: int, budget: float,
            impl: str = "fused", qat: bool = False, savers: MemorySavers = NO_SAVERS) -> list[dict]:
    """The savers not yet on, added one after another (LADDER), then context parallelism doubled while the layout
    allows it on this world size (Transformer Engine's spec only): for each, the overrides that turn it on (a list),
    the longest sequence that then fits, and a note where there is one."""
    import dataclasses

    from gptoss_nemo.errors import ConfigError

    out = []
    for overrides, change in LADDER:
        if all(getattr(savers, k) == v for k, v in change.items()):
            continue
        savers = dataclasses.replace(savers, **change)
        out.append({"turn_on": list(overrides), "longest_seq_length_that_fits": longest_fitting(
            cfg, layout, world_size, micro_batch, budget, impl=impl, qat=qat, savers=savers)})
    while impl == "te":
        wider = dataclasses.replace(layout, cp=layout.cp * 2)
        try:
            wider.validate(cfg, world_size, te=True)
        except ConfigError:
            break
        layout = wider
        out.append({"turn_on": [f"parallel.cp={layout.cp}", "data.packing=false"],
                    "note": f"data parallel {layout.data_parallel(world_size)}; context parallelism is not yet proven "
                            "on GPUs",
                    "longest_seq_length_that_fits": longest_fitting(cfg, layout, world_size, micro_batch, budget,
                                                                    impl=impl, qat=qat, savers=savers)})
    return out
