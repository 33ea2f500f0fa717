"""Training-step speed on gpt-oss-20b layer shapes: gptoss-nemo's megatron model under each implementation
(model/impl.py: fused local kernels, Transformer Engine's spec, megatron's reference modules; BF16 SFT or QAT)
against Hugging Face transformers `GptOssForCausalLM` (eager and flex attention), same shapes, same GPU. Prints one
JSON line per variant, then (--suite) one summary line. The te rows need Transformer Engine (skipped, with the
reason in their row, where it does not import); with TE installed every megatron row steps with TE's fused Adam.

Shapes: hidden 2880, 64 query / 8 KV heads of 64, 32 experts top-4 of width 2880, sinks, layers alternating
sliding (128) / full, vocabulary 201088 with an untied output layer; `--layers` (default 2: one of each) so it fits
one GPU. Random weights, random tokens, the real (learned, unbalanced) router, the load-balancing loss on.

FLOPs (gptoss_nemo/train/flops.py, the same count for every variant): per token and layer, forward
2*(H*(Q+2K) + Q*H) projections + 2*H*E router + 2*k*(H*2I + I*H) for the k active experts + 4*heads*d*c attention,
c = the mean number of keys a query sees under the causal mask, capped by the window on sliding layers; plus
2*H*V for the output layer; training = 3x forward. MFU = TFLOP/s over the device's dense BF16 peak (H100/H200 SXM:
989 TFLOP/s; --peak-tflops for others).

What is timed (after --warmup steps, CUDA-synchronised wall clock, median over --steps):
  megatron   one optimizer step over --micro-batches micro-batches of one sequence (gradient accumulation, the
             distributed optimizer's AdamW on FP32 main weights): "step_s"; its forward+backward part per
             micro-batch: "fwd_bwd_s"; tokens/s and MFU from the whole step ("tokens_per_s") and from
             forward+backward alone ("fwd_bwd_tokens_per_s", the quantity the transformers rows measure).
  hf         forward+backward of one sequence (loss + the router aux loss), no optimizer step.
Memory savers (gptoss_nemo/train/memory_savers.py; --suite's memory variants, --recompute, --moments, --grads,
--offload): activation recompute and lighter optimizer states, timed and measured the same way, so their rows give
what each costs per step and saves in memory against the plain row.
Peak memory: the largest of the ranks' peaks (all in "peak_gib_per_rank": routing is not balanced), beside the
planner's per-GPU estimate for the same run ("planned_gib", gptoss_nemo/plan/memory.py).

Expert parallelism: EP = the number of GPUs (TP = PP = 1, so data parallel over the same GPUs: each GPU runs its own
--micro-batches sequences; experts split EP ways, tokens exchanged all-to-all). tokens/s and TFLOP/s are per GPU.
--scaling 1 2 4 runs the megatron variant once per GPU count (torchrun, EP = that count) and reports the scaling
efficiency: tokens/s per GPU at N GPUs over tokens/s at the smallest count.

    python benchmarks/train_step.py --suite [--seq 4096 8192] [--layers 2]        every variant, one GPU
    python benchmarks/train_step.py --impl fused --quant mxfp4 --seq 4096
    python benchmarks/train_step.py --impl te --profile                           TE's spec, with its kernel profile
    torchrun --nproc-per-node 4 benchmarks/train_step.py --impl fused --ep 4      expert parallel (tokens/s per GPU)
    python benchmarks/train_step.py --scaling 1 2 4 [--layers 2]                   EP1 / EP2 / EP4 and the efficiency
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DENSE_BF16_PEAK = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "GB200": 2500.0}


def model_config(layers: int, vocab: int):
    from gptoss_nemo.model.presets import gpt_oss_20b

    return gpt_oss_20b().replace(num_hidden_layers=layers, vocab_size=vocab, quantized=False,
                                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                              for i in range(layers)])


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, value in DENSE_BF16_PEAK.items():
        if key in name:
            return value
    return float("nan")


def device_info() -> dict:
    import transformers

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
        info["modelopt"] = version("nvidia-modelopt")
    except Exception:  # the transformers-only variants run without them
        pass
    return info


def rates(cfg, seq: int, tokens: int, seconds: float, peak: float) -> dict:
    from gptoss_nemo.train.flops import train_flops_per_token

    tflops = train_flops_per_token(cfg, seq) * tokens / seconds / 1e12
    return {"tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / peak}


def planned_gib(cfg, layout, world: int, args, savers) -> dict:
    """`gptoss-nemo plan`'s per-GPU estimate for this run (micro-batches of one sequence)."""
    from gptoss_nemo.plan.memory import estimate, fused_adam_here

    mem, _ = estimate(cfg, layout, world, args.seq, 1, impl=args.impl, qat=args.quant != "none", savers=savers,
                      fused_adam=fused_adam_here())
    return {k: round(v, 2) for k, v in mem.gib().items()}


def synthetic_sequences(n: int, seq: int, vocab: int, seed: int):
    from gptoss_nemo.data.packing import Sequence

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq + 1,), generator=g)
        out.append(Sequence(ids[:-1].clone(), ids[1:].clone(), torch.ones(seq), torch.arange(seq),
                            torch.tensor([0, seq], dtype=torch.int32)))
    return out


def profile_summary(fn, rows: int = 25) -> dict:
    """GPU kernel time of one call of fn: the total, and the kernels taking most of it (by name)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    return {"kernel_ms": round(total / 1e3, 1),
            "top": [{"kernel": e.key[:100], "ms": round(e.self_device_time_total / 1e3, 2),
                     "share": round(e.self_device_time_total / total, 4), "calls": e.count} for e in top]}


def run_megatron(args) -> dict:
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from gptoss_nemo.config.sft import OptimizerConfig, TrainConfig
    from gptoss_nemo.model.build import build_rank_model
    from gptoss_nemo.model.megatron_config import RouterConfig
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.parallel.setup import init_distributed
    from gptoss_nemo.train.batches import GlobalBatches
    from gptoss_nemo.train.memory_savers import MemorySavers
    from gptoss_nemo.train.step import build_training, run_global_batch

    cfg = model_config(args.layers, args.vocab)
    layout = ParallelLayout(tp=1, ep=args.ep, pp=1)
    me = init_distributed(layout, seed=1234)
    world = torch.distributed.get_world_size()
    train = TrainConfig(steps=args.warmup + args.steps + 2, recompute=args.recompute,
                        recompute_modules=args.recompute_modules, recompute_layers=args.recompute_layers)
    opt = OptimizerConfig(lr=1e-5, warmup_steps=1, exp_avg_dtype=args.moments, exp_avg_sq_dtype=args.moments,
                          main_params_dtype=args.main_params, main_grads_dtype=args.grads,
                          cpu_offload_fraction=args.offload)
    savers = MemorySavers.of(train, opt)
    savers.check(args.impl, cfg, layout)
    gpt = build_rank_model(cfg, layout, RouterConfig(), impl=args.impl, calculate_per_token_loss=True,
                           cross_entropy_loss_fusion=args.fused_ce, cross_entropy_fusion_impl="native",
                           **savers.transformer_fields())
    recipe = SimpleNamespace(optimizer=opt, train=train, memory=savers)
    model, optimizer, scheduler = build_training(recipe, gpt)
    if args.quant != "none":
        from gptoss_nemo.quantize import modelopt_state

        modelopt_state.quantize(gpt, args.quant)
    dp = ps.get_data_parallel_world_size()
    mb = args.micro_batches
    batches = GlobalBatches(synthetic_sequences(mb * dp * 2, args.seq, cfg.vocab_size, seed=me.rank),
                            global_batch_size=mb * dp, micro_batch_size=1, dp_rank=ps.get_data_parallel_rank(),
                            dp_size=dp, seed=0)

    def step(i: int) -> tuple[float, float]:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_global_batch(model, batches, i % 2, args.seq, forward_only=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        optimizer.step()
        scheduler.step(increment=1)
        torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t0

    for i in range(args.warmup):
        step(i)
    torch.cuda.reset_peak_memory_stats()
    times = [step(i) for i in range(args.steps)]
    fwd_bwd = statistics.median(t[0] for t in times)
    whole = statistics.median(t[1] for t in times)
    peak = peak_tflops(args)
    tokens = mb * args.seq  # per GPU and step
    peaks = [None] * world  # every rank's peak: routing is not balanced, so expert ranks differ
    torch.distributed.all_gather_object(peaks, torch.cuda.max_memory_allocated() / 2**30)
    planned = planned_gib(cfg, layout, world, args, savers)
    out = {"impl": args.impl, "quant": args.quant, "seq": args.seq, "layers": args.layers,
           "memory_savers": savers.changed(),
           "ep": args.ep, "gpus": world, "micro_batches": mb, "fused_ce": args.fused_ce,
           "step_s": whole, "fwd_bwd_s": fwd_bwd / mb, "optimizer_s": whole - fwd_bwd,
           **rates(cfg, args.seq, tokens, whole, peak),
           **{f"fwd_bwd_{k}": v for k, v in rates(cfg, args.seq, tokens, fwd_bwd, peak).items()},
           "peak_gib": max(peaks), "peak_gib_per_rank": [round(x, 2) for x in peaks],
           "planned_gib": planned, "planned_over_peak": planned["total"] / max(peaks), **device_info()}
    if args.profile and me.rank == 0:
        out["profile_global_batch_fwd_bwd"] = profile_summary(
            lambda: run_global_batch(model, batches, 0, args.seq, False))
    return out


def run_hf(args) -> dict:
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    cfg = model_config(args.layers, args.vocab)
    hfc = HFConfig(**cfg.to_dict())
    hfc.output_router_logits = True  # the router's aux loss, as in our SFT
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GptOssForCausalLM._from_config(hfc, attn_implementation=args.attn, dtype=torch.bfloat16)
    model.train()
    seqs = synthetic_sequences(2, args.seq, cfg.vocab_size, seed=0)

    def step(i: int) -> float:
        s = seqs[i % 2]
        ids, labels = s.tokens[None].cuda(), s.tokens[None].cuda()  # transformers shifts the labels itself
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(i)
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd = statistics.median(step(i) for i in range(args.steps))
    out = {"impl": "transformers", "attn": args.attn, "seq": args.seq, "layers": args.layers, "fwd_bwd_s": fwd_bwd,
           **{f"fwd_bwd_{k}": v for k, v in rates(cfg, args.seq, args.seq, fwd_bwd, peak_tflops(args)).items()},
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **device_info()}
    if args.profile:
        out["profile_fwd_bwd"] = profile_summary(lambda: step(0))
    return out


SUITE = {  # key: (name, extra arguments); one process each, so every variant starts with the GPU to itself
    "fused": ("megatron local, fused kernels", ["--impl", "fused"]),
    "te": ("megatron Transformer Engine spec", ["--impl", "te"]),
    "fused-ce": ("megatron local, fused kernels, fused cross entropy", ["--impl", "fused", "--fused-ce"]),
    "hf-flex": ("transformers flex_attention", ["--impl", "hf", "--attn", "flex_attention"]),
    "qat": ("megatron local, fused kernels, QAT mxfp4", ["--impl", "fused", "--quant", "mxfp4"]),
    "te-qat": ("megatron Transformer Engine spec, QAT mxfp4", ["--impl", "te", "--quant", "mxfp4"]),
    "hf-eager": ("transformers eager", ["--impl", "hf", "--attn", "eager"]),
    "reference": ("megatron local, reference kernels", ["--impl", "reference"]),
    # memory savers (issue 23): what each costs per step and saves, against "fused" / "te"
    "full": ("fused, full recompute", ["--impl", "fused", "--recompute", "full"]),
    "sel-moe": ("fused, selective recompute of the MoE block", ["--impl", "fused", "--recompute", "selective",
                                                                  "--recompute-modules", "moe"]),
    "bf16-states": ("fused, BF16 Adam moments", ["--impl", "fused", "--moments", "bf16"]),
    "bf16-states-grads": ("fused, BF16 Adam moments and gradients", ["--impl", "fused", "--moments", "bf16",
                                                                      "--grads", "bf16"]),
    "offload-half": ("fused, half the optimizer on the CPU", ["--impl", "fused", "--offload", "0.5"]),
    "te-full": ("TE spec, full recompute", ["--impl", "te", "--recompute", "full"]),
    "te-moe-act": ("TE spec, selective recompute of the experts' activation and norms",
                   ["--impl", "te", "--recompute", "selective", "--recompute-modules", "moe_act", "layernorm"]),
}
MEMORY_VARIANTS = ("fused", "full", "sel-moe", "bf16-states", "bf16-states-grads", "offload-half", "te", "te-full",
                   "te-moe-act")
PROFILED = ("fused", "te", "hf-flex")


def _child_row(cmd: list[str], args, **tags) -> dict:
    """Run one variant as its own process: its last JSON line (or its error) with `tags`, timed, printed."""
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("{")), None)
    row = json.loads(line) if line and r.returncode == 0 else {"error": r.stderr[-1500:]}
    row.update(tags, wall_s=round(time.time() - t0, 1))
    print(json.dumps(row), flush=True)
    return row


def _shape_args(args, seq: int) -> list[str]:
    return ["--seq", str(seq), "--layers", str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--micro-batches", str(args.micro_batches)]


def run_suite(args) -> dict:
    rows = []
    for seq in args.seq_list:
        for key in args.variants:
            name, extra = SUITE[key]
            profile = ["--profile"] if args.profile and key in PROFILED else []
            rows.append(_child_row([sys.executable, __file__, *extra, *_shape_args(args, seq), *profile], args,
                                   name=name, seq=seq, key=key))
    summary = {"suite": True, "layers": args.layers, "rows": len(rows)}
    for seq in args.seq_list:
        by = {r["name"]: r for r in rows if r["seq"] == seq and "error" not in r}
        flex = by.get("transformers flex_attention", {}).get("fwd_bwd_tokens_per_s")
        ours = by.get("megatron local, fused kernels", {})
        qat = by.get("megatron local, fused kernels, QAT mxfp4", {})
        te = by.get("megatron Transformer Engine spec", {})
        if te and ours:
            summary[f"s{seq}_te_over_fused_step_tokens_per_s"] = te["tokens_per_s"] / ours["tokens_per_s"]
        if flex and ours:
            summary[f"s{seq}_step_vs_hf_flex"] = ours["tokens_per_s"] / flex
            summary[f"s{seq}_fwd_bwd_vs_hf_flex"] = ours["fwd_bwd_tokens_per_s"] / flex
        if ours:
            summary[f"s{seq}_mfu_step"] = ours["mfu"]
            summary[f"s{seq}_mfu_fwd_bwd"] = ours["fwd_bwd_mfu"]
        if ours and qat:
            summary[f"s{seq}_qat_over_bf16_step_time"] = qat["step_s"] / ours["step_s"]
        plain = {r["impl"]: r for r in rows if r["seq"] == seq and "error" not in r and not r.get("memory_savers")
                 and r.get("quant") == "none" and r["key"] in ("fused", "te")}
        for r in rows:  # each memory saver against the plain row of its implementation
            if r["seq"] == seq and "error" not in r and r.get("memory_savers") and r["impl"] in plain:
                base = plain[r["impl"]]
                summary[f"s{seq}_{r['key']}"] = {"step_time_x": round(r["step_s"] / base["step_s"], 3),
                                                 "peak_gib": round(r["peak_gib"], 2),
                                                 "plain_peak_gib": round(base["peak_gib"], 2),
                                                 "planned_over_peak": round(r["planned_over_peak"], 3)}
    return summary


def run_scaling(args) -> dict:
    """The megatron variant (--impl, --quant) at each GPU count of --scaling, EP = that count."""
    rows = [_child_row([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                        "--master-port=29571", __file__, "--impl", args.impl, "--quant",
                        args.quant, "--ep", str(n), *_shape_args(args, args.seq_list[0])], args, ep=n)
            for n in args.scaling]
    ok = [r for r in rows if "error" not in r]
    summary = {"scaling": True, "layers": args.layers, "seq": args.seq_list[0], "impl": args.impl,
               "quant": args.quant}
    if ok:
        base = ok[0]
        for r in ok:
            summary[f"gpus{r['gpus']}_tokens_per_s_per_gpu"] = r["tokens_per_s"]
            summary[f"gpus{r['gpus']}_tflops_per_gpu"] = r["tflops"]
            summary[f"gpus{r['gpus']}_efficiency_vs_{base['gpus']}"] = r["tokens_per_s"] / base["tokens_per_s"]
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", action="store_true", help="every variant, one process each, then a summary")
    p.add_argument("--impl", choices=["fused", "te", "reference", "hf"], default="fused",
                   help="the megatron model's implementation (model/impl.py), or hf: transformers")
    p.add_argument("--quant", choices=["none", "mxfp4", "nvfp4"], default="none")
    p.add_argument("--attn", choices=["eager", "flex_attention", "sdpa"], default="flex_attention")
    p.add_argument("--seq", type=int, nargs="+", default=[4096], dest="seq_list")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fused-ce", action="store_true", help="megatron's fused (native) cross entropy")
    p.add_argument("--profile", action="store_true", help="add a per-kernel CUDA time summary of one fwd+bwd")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none", help="train.recompute")
    p.add_argument("--recompute-modules", nargs="+", default=["moe"], help="train.recompute_modules (selective)")
    p.add_argument("--recompute-layers", type=int, default=None, help="train.recompute_layers (full)")
    p.add_argument("--moments", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="optimizer.exp_avg_dtype and exp_avg_sq_dtype")
    p.add_argument("--main-params", choices=["fp32", "fp16"], default="fp32", help="optimizer.main_params_dtype")
    p.add_argument("--grads", choices=["fp32", "bf16"], default="fp32", help="optimizer.main_grads_dtype")
    p.add_argument("--offload", type=float, default=0.0, help="optimizer.cpu_offload_fraction")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--variants", nargs="+", choices=list(SUITE), default=[k for k in SUITE if k not in MEMORY_VARIANTS
                                                                        or k in ("fused", "te")],
                   help=f"what --suite runs (the memory savers' rows: {' '.join(MEMORY_VARIANTS)})")
    p.add_argument("--scaling", type=int, nargs="+", metavar="GPUS", help="the megatron variant at each GPU count")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args(argv)
    if args.suite or args.scaling:
        print(json.dumps(run_suite(args) if args.suite else run_scaling(args)), flush=True)
        return
    args.seq = args.seq_list[0]
    out = run_hf(args) if args.impl == "hf" else run_megatron(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
