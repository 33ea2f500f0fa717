"""The `gptoss-nemo` command. Each stage adds its subcommand here; the work lives in the stage's subpackage."""

from __future__ import annotations

import argparse
import json
import sys

from gptoss_nemo import __version__
from gptoss_nemo.errors import EXIT_CHECKED_ONLY, EXIT_INPUT, ConfigError, DataError, DeviceError, GptOssNemoError

TINY_FLAGS = {"num_hidden_layers": "--layers", "hidden_size": "--hidden", "intermediate_size": "--expert-width",
              "num_attention_heads": "--heads", "num_key_value_heads": "--kv-heads", "head_dim": "--head-dim",
              "num_local_experts": "--experts", "num_experts_per_tok": "--top-k"}


def _make_tiny(args: argparse.Namespace) -> int:
    from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_nemo.model.presets import tiny

    try:
        cfg = tiny(layers=args.layers, hidden=args.hidden, experts=args.experts, expert_width=args.expert_width,
                   heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, top_k=args.top_k)
    except ConfigError as e:  # config.json's field names, as this command's flags
        message = str(e).removeprefix("config.json: ")
        for field, flag in TINY_FLAGS.items():
            message = message.replace(field, flag)
        raise ConfigError(message) from None
    path = write_tiny_checkpoint(args.out_dir, cfg, seed=args.seed, quantized=not args.bf16, overwrite=args.overwrite)
    layout = "BF16" if args.bf16 else "MXFP4"
    print(f"wrote {layout} gpt-oss checkpoint ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}) to {path}")
    return 0


def _positive(args: argparse.Namespace, *names: str) -> None:
    """Numeric flags that must be > 0, refused by their flag name."""
    for name in names:
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")


def _layout(args: argparse.Namespace):
    from gptoss_nemo.parallel.layout import ParallelLayout

    return ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp)


def _import(args: argparse.Namespace) -> int:
    from gptoss_nemo.convert.import_hf import run_import

    summary = _distributed(run_import, args.hf_dir, args.out_ckpt, args)
    if _rank0():
        print(json.dumps({"imported": summary}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from gptoss_nemo.convert.hf_export import run_export

    path = _distributed(run_export, args.ckpt, args.out_dir, args, fmt=args.format)
    if _rank0():
        print(f"wrote {args.format.upper()} Hugging Face checkpoint to {path}")
    return 0


def _impl(args: argparse.Namespace, recipe_impl: str = "auto") -> str:
    """The implementation asked for (model/impl.py): --impl over the recipe's model.impl, then --local-spec."""
    from gptoss_nemo.model.impl import with_local_spec

    return with_local_spec(args.impl or recipe_impl, args.local_spec)


def _load_stage_recipe(cls, args: argparse.Namespace):
    """A recipe with the command line's --impl / --local-spec applied to its model.impl."""
    from gptoss_nemo.config.load import load_recipe

    recipe = load_recipe(cls, args.recipe, args.overrides)
    recipe.model.impl = _impl(args, recipe.model.impl)
    return recipe


def _distributed(run, src: str, dst: str, args: argparse.Namespace, **kwargs):
    """Run a multi-rank stage command; the process group is torn down however it ends."""
    from gptoss_nemo.parallel.setup import shutdown

    try:
        return run(src, dst, _layout(args), overwrite=args.overwrite, impl=_impl(args), **kwargs)
    finally:
        shutdown()


def _plan(args: argparse.Namespace) -> int:
    from gptoss_nemo.config.pipeline import PipelineRecipe, is_pipeline_recipe
    from gptoss_nemo.config.sft import SFTRecipe
    from gptoss_nemo.model.impl import resolve_impl
    from gptoss_nemo.plan.memory import GIB, estimate, further, longest_fitting
    from gptoss_nemo.train.sft import check_sequence_split

    _positive(args, "world_size", "gpu_memory_gib", "tflops")
    pipeline = is_pipeline_recipe(args.recipe)
    recipe = _load_stage_recipe(PipelineRecipe if pipeline else SFTRecipe, args)
    if args.model:
        from gptoss_nemo.model.presets import preset

        cfg = preset(args.model)
    elif pipeline:
        from gptoss_nemo.pipeline.run import hf_config

        cfg = hf_config(recipe)
    else:
        from gptoss_nemo.convert.dist_checkpoint import read_dist_checkpoint_config

        cfg, _ = read_dist_checkpoint_config(recipe.checkpoint)
    qat_stage = pipeline and recipe.qat.enabled
    if pipeline:  # the QAT stage holds the most (same layout and data, plus the fake-quantized experts)
        recipe = recipe.qat_recipe() if qat_stage else recipe.sft_recipe()
    impl = resolve_impl(recipe.model.impl, layout=recipe.parallel, training=True, here=False)  # the job's machine
    recipe.parallel.validate(cfg, args.world_size, te=impl.te)
    check_sequence_split(recipe.data, recipe.parallel, impl.te)
    savers = recipe.memory
    savers.check(impl.name, cfg, recipe.parallel, here=False)
    qat = getattr(recipe, "quant", None) is not None  # a pipeline's QAT stage, planned above
    mem, stage = estimate(cfg, recipe.parallel, args.world_size, recipe.data.seq_length,
                          recipe.train.micro_batch_size, impl=impl.name, qat=qat, savers=savers)
    fits = mem.total <= args.gpu_memory_gib * GIB
    longest = longest_fitting(cfg, recipe.parallel, args.world_size, recipe.train.micro_batch_size,
                              args.gpu_memory_gib * GIB, impl=impl.name, qat=qat, savers=savers)
    ladder = further(cfg, recipe.parallel, args.world_size, recipe.train.micro_batch_size, args.gpu_memory_gib * GIB,
                     impl=impl.name, qat=qat, savers=savers)
    if pipeline:  # a pipeline recipe sets the savers per stage: name both stages' keys
        from gptoss_nemo.config.load import qualify

        for step in ladder:
            step["turn_on"] = list(dict.fromkeys(qualify(o, s) for s in ("sft", "qat") for o in step["turn_on"]))
    from gptoss_nemo.train.flops import train_flops_per_token

    tokens = recipe.train.global_batch_size * recipe.data.seq_length
    step_s = train_flops_per_token(cfg, recipe.data.seq_length) * tokens / (args.world_size * args.tflops * 1e12)
    print(json.dumps({"layout": {"tp": recipe.parallel.tp, "ep": recipe.parallel.ep, "pp": recipe.parallel.pp,
                                 "world_size": args.world_size}, "impl": impl.name, "busiest_stage": stage,
                      "per_gpu_gib": mem.gib(),
                      "qat": qat, "gpu_memory_gib": args.gpu_memory_gib, "fits": fits,
                      "seq_length": recipe.data.seq_length, "longest_seq_length_that_fits": longest,
                      "memory_savers": savers.changed(),
                      "to_go_further": ladder,
                      "tokens_per_step": tokens,
                      "step_seconds_estimate": round(step_s, 3), "assumed_tflops_per_gpu": args.tflops,
                      "data": None if args.no_data else _data_lengths(recipe.data)}))
    if not fits:
        longest_text = f"data.seq_length <= {longest} fits" if longest else "not even 1024 tokens fit"
        print(f"gptoss-nemo plan: warning: the estimate ({mem.total / GIB:.1f} GiB) exceeds {args.gpu_memory_gib} GiB "
              f"per GPU ({longest_text} with this layout and micro-batch); raise ep/pp, lower data.seq_length or "
              f"train.micro_batch_size{_ladder_text(ladder)}", file=sys.stderr)
    return 0


def _ladder_text(ladder: list[dict]) -> str:
    steps = [" ".join(x["turn_on"]) + (f" ({x['note']})" if "note" in x else "")
             + f" -> {x['longest_seq_length_that_fits'] or 'none'}" for x in ladder]
    return (f", or turn on (each adding to the one before; the longest sequence that then fits): {'; '.join(steps)}"
            if steps else "")


def _data_lengths(data) -> dict:
    """The training data's length distribution, where this machine can read it (the data may live on the cluster)."""
    from gptoss_nemo.data.dataset import length_report
    from gptoss_nemo.tokenizer.o200k_harmony import hf_tokenizer

    try:
        return length_report(data, hf_tokenizer())
    except DataError as e:
        return {"not_read": str(e)}


def _train_stage(args: argparse.Namespace) -> int:
    """sft, qat (the SFT loop on a fake-quantized model) and ptq (quantize, no training)."""
    import logging

    from gptoss_nemo.launch.stage import STAGES
    from gptoss_nemo.parallel.setup import shutdown
    from gptoss_nemo.train.sft import dry_run, run_sft

    logging.basicConfig(level=logging.INFO if _rank0() else logging.WARNING, format="%(asctime)s %(message)s")
    recipe = _load_stage_recipe(STAGES[args.command], args)
    if args.dry_run:
        plan = dry_run(recipe)
        if _rank0():
            print(json.dumps({"dry_run": plan}))
        return 0
    if args.command == "ptq":
        from gptoss_nemo.quantize.qat import run_ptq as run
    else:
        run = run_sft
    try:
        summary = run(recipe)
    finally:
        shutdown()
    if _rank0():
        print(json.dumps({args.command: {"out_dir": recipe.train.out_dir, **summary}}))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    import logging

    from gptoss_nemo.config.pipeline import PipelineRecipe
    from gptoss_nemo.evaluate.hf_eval import table
    from gptoss_nemo.parallel.setup import shutdown
    from gptoss_nemo.pipeline.run import dry_run, run

    logging.basicConfig(level=logging.INFO if _rank0() else logging.WARNING, format="%(asctime)s %(message)s")
    recipe = _load_stage_recipe(PipelineRecipe, args)
    import torch

    checked_only = not args.dry_run and not torch.cuda.is_available()
    if checked_only:
        print("gptoss-nemo pipeline: no CUDA GPU here, so no stage runs: checking the recipe, model and data and "
              f"printing the plan instead, then exiting with {EXIT_CHECKED_ONLY} (--dry-run asks for only this, "
              "and exits 0)", file=sys.stderr)
    if args.dry_run or checked_only:
        plan = dry_run(recipe)
        if _rank0():
            print(json.dumps({"dry_run": plan}))
        return EXIT_CHECKED_ONLY if checked_only else 0
    try:
        summary = run(recipe, only=args.only)
    finally:
        shutdown()
    if _rank0():
        if summary["eval"]:
            print(table([{**r, "checkpoint": r["stage"]} for r in summary["eval"]]))
        print("export: " + ", ".join(summary["export"]))
        print(json.dumps({"pipeline": summary}))
    return 0


def _verify_export(args: argparse.Namespace) -> int:
    from gptoss_nemo.evaluate.verify_export import verify_export
    from gptoss_nemo.parallel.setup import shutdown

    _positive(args, "samples", "seq_length", "max_new_tokens")
    data = args.data or ["synthetic:arithmetic:256:7"]
    if args.engine == "vllm":
        return _verify_export_vllm(args, data)
    if args.against is None:
        raise ConfigError("verify-export --engine megatron compares the export with the checkpoint it came from: "
                          "give it with --against CKPT (or use --engine vllm)")
    try:
        r = verify_export(args.out_dir, args.against, _layout(args), data=data,
                          samples=args.samples, seq_length=args.seq_length, impl=_impl(args), floor=not args.no_floor,
                          router_dtype=args.router_dtype)
    finally:
        shutdown()
    if r is not None:
        line = f"verify-export: {r['sequences']} sequences x {r['seq_length']} tokens: cosine min {r['min_cos']:.6f} " \
               f"mean {r['mean_cos']:.6f}, top-1 agreement {r['top1']:.2%}"
        if "transformers_bf16_vs_fp32" in r:
            f, m = r["transformers_bf16_vs_fp32"], r["megatron_vs_transformers_fp32"]
            line += f" (against transformers' FP32: transformers BF16 {f['min_cos']:.6f}, {f['top1']:.2%}; " \
                    f"megatron BF16 {m['min_cos']:.6f}, {m['top1']:.2%})"
        print(line)
        print(json.dumps({"verify_export": r}))
    return 0


def _verify_export_vllm(args: argparse.Namespace, data: list[str]) -> int:
    """verify-export --engine vllm: 0 when vLLM agrees within the rule, 1 when it does not."""
    from gptoss_nemo.evaluate.verify_vllm import passed, report, verify_with_vllm
    from gptoss_nemo.parallel.setup import shutdown

    try:
        r = verify_with_vllm(args.out_dir, data=data, samples=args.samples, seq_length=args.seq_length,
                             max_new_tokens=args.max_new_tokens, dtype=args.dtype, against=args.against,
                             layout=_layout(args), impl=_impl(args), floor=not args.no_floor,
                             router_dtype=args.router_dtype)
    finally:
        shutdown()
    if r is None:
        return 0
    print("\n".join(report(r)))
    print(json.dumps({"verify_export": r}))
    return 0 if passed(r) else 1


def _eval(args: argparse.Namespace) -> int:
    from gptoss_nemo.data.harmony import RenderOptions
    from gptoss_nemo.evaluate.hf_eval import check_source, evaluate, table

    _positive(args, "samples", "max_new_tokens")
    for ckpt in args.ckpt:  # every checkpoint before the first one loads
        check_source(ckpt)
    opts = RenderOptions(loss_on=args.loss_on)
    rows = [evaluate(ckpt, args.data, args.checker, samples=args.samples, max_new_tokens=args.max_new_tokens,
                     opts=opts, impl=_impl(args)) for ckpt in args.ckpt]
    print(table(rows))
    print(json.dumps({"eval": rows}))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from gptoss_nemo.launch.stage import launch

    launch(args.stage, args.recipe, args.overrides, mode=args.mode, dry_run=args.dry_run, impl=args.impl,
           local_spec=args.local_spec)
    return 0


def _rank0() -> bool:
    from gptoss_nemo.parallel.setup import env_rank, env_world_size

    try:
        env_world_size()  # checks RANK against it too
        return env_rank() == 0
    except GptOssNemoError:  # a malformed launch environment: every process says so
        return True


def _impl_args(p) -> None:
    from gptoss_nemo.model.impl import CHOICES

    p.add_argument("--impl", choices=CHOICES, default=None,
                   help="the model's implementation (default: the recipe's model.impl, else auto = fused, or te "
                        "where training needs tensor parallelism)")
    p.add_argument("--local-spec", action="store_true",
                   help="megatron's local spec, not Transformer Engine's: turns te and auto into fused")


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel layout (launch with torchrun/srun; world size = WORLD_SIZE)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    _impl_args(g)


def _recipe_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """RECIPE [a.b=c ...] [--impl] [--local-spec] [--dry-run]: what every recipe-driven stage takes."""
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    _impl_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe, checkpoint, layout and data and print the plan; no GPU needed")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-nemo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gptoss-nemo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a seeded random gpt-oss checkpoint in the openai/gpt-oss layout")
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128, help="hidden size (multiple of 32)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=128, help="expert intermediate size (multiple of 32)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default 4, at most --experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="write dequantized BF16 experts instead of MXFP4")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("import", help="Hugging Face gpt-oss (MXFP4 or BF16) -> megatron distributed checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")
    p.add_argument("--overwrite", action="store_true")
    _parallel_args(p)
    p.set_defaults(func=_import)

    p = sub.add_parser("plan", help="per-GPU memory estimate of a recipe's layout, before any GPU time")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--world-size", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--model", help="a preset (gpt-oss-20b, gpt-oss-120b, tiny) instead of the recipe's checkpoint")
    p.add_argument("--tflops", type=float, default=400.0,
                   help="achieved BF16 TFLOP/s per GPU assumed for the step-time estimate (model FLOPs, active "
                        "experts only; 400 is about 40%% of an H100's dense BF16 peak)")
    p.add_argument("--no-data", action="store_true", help="do not read the training data for its length "
                                                          "distribution (tokens per conversation)")
    _impl_args(p)
    p.set_defaults(func=_plan)

    for stage, text in (("sft", "BF16 fine-tuning with the router and its load-balancing loss (torchrun/srun)"),
                        ("qat", "quantization-aware training (ModelOpt MXFP4/NVFP4 fake quant on the experts) of an "
                                "SFT checkpoint (torchrun/srun)"),
                        ("ptq", "post-training quantization of an SFT checkpoint, no training (torchrun/srun)")):
        _recipe_args(sub.add_parser(stage, help=text)).set_defaults(func=_train_stage)

    p = _recipe_args(sub.add_parser("pipeline", help="import -> SFT -> PTQ -> QAT -> export -> eval from one "
                                                     "recipe; a rerun continues after the last complete stage "
                                                     "(torchrun/srun)"))
    p.add_argument("--only", choices=["hf", "import", "sft", "ptq", "qat", "export", "eval"],
                   help="run this stage only (when it is not done)")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("verify-export", help="compare a Hugging Face export's logits (transformers) with the "
                                             "gptoss-nemo checkpoint it came from (megatron, fake quant), or serve "
                                             "it with vLLM and compare with transformers (--engine vllm)")
    p.add_argument("out_dir", help="the export (gptoss-nemo export ... OUT_DIR)")
    p.add_argument("--engine", choices=["megatron", "vllm"], default="megatron",
                   help="megatron: transformers on the export vs the checkpoint (needs --against); vllm: vLLM "
                        "($GPTOSS_NEMO_VLLM_PYTHON, else this Python's) serves the export, compared with "
                        "transformers on it, and with the checkpoint when --against is given (GPUs)")
    p.add_argument("--against", default=None, help="the gptoss-nemo checkpoint it was exported from")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="--engine vllm: the dtype vLLM and transformers run in (float32: an unquantized export must "
                        "match exactly)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="--engine vllm: greedy tokens per prompt")
    p.add_argument("--data", action="append", default=None,
                   help="conversations (JSONL/parquet or synthetic:...) rendered into the compared sequences")
    p.add_argument("--samples", type=int, default=8, help="sequences compared")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--no-floor", action="store_true", help="skip transformers' BF16-vs-FP32 reference distance")
    p.add_argument("--router-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the megatron model's router: fp32 (as trained) or bf16 (as transformers routes)")
    _parallel_args(p)
    p.set_defaults(func=_verify_export)

    p = sub.add_parser("eval", help="validation loss and generation pass rate of Hugging Face gpt-oss checkpoints")
    p.add_argument("ckpt", nargs="+", help="Hugging Face checkpoint directories (BF16 or MXFP4), or gptoss-nemo "
                   "checkpoints (BF16, PTQ, QAT: exported in-process on one GPU first)")
    p.add_argument("--data", action="append", required=True,
                   help="JSONL/parquet conversations or synthetic:arithmetic:N[:SEED] (repeatable)")
    p.add_argument("--checker", default="arithmetic", help="arithmetic | contains:TEXT | regex:PATTERN")
    p.add_argument("--samples", type=int, default=64, help="conversations evaluated (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--loss-on", default="assistant", choices=["assistant", "final", "last_turn"])
    _impl_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("launch", help="run a stage on a Slurm cluster (sbatch, one task per GPU) or one node")
    p.add_argument("stage", choices=["sft", "qat", "ptq", "pipeline"])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--print", dest="mode", action="store_const", const="print",
                      help="print the sbatch script and the command that submits it")
    mode.add_argument("--submit", dest="mode", action="store_const", const="submit", help="submit it with sbatch")
    mode.add_argument("--local", dest="mode", action="store_const", const="local",
                      help="run on this node with torchrun (cluster.gpus_per_node processes)")
    p.add_argument("--dry-run", action="store_true", help="launch the stage's --dry-run (CPU tasks, no GPUs)")
    _impl_args(p)
    p.set_defaults(func=_launch)

    p = sub.add_parser("export", help="gptoss-nemo checkpoint -> Hugging Face checkpoint")
    p.add_argument("ckpt")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=["bf16", "mxfp4", "nvfp4"], default="bf16",
                   help="bf16: the experts as the model computes with them (a QAT/PTQ checkpoint's fake-quantized "
                        "weights); mxfp4: experts in openai/gpt-oss's MXFP4 layout (exactly QAT's values); nvfp4: "
                        "ModelOpt's HF NVFP4 layout (an nvfp4 / nvfp4_w4a4 QAT or PTQ checkpoint)")
    p.add_argument("--overwrite", action="store_true")
    _parallel_args(p)
    p.set_defaults(func=_export)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with `a.b=c` overrides allowed after the flags too (`sft R.yaml --dry-run train.steps=5`)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}"
                     + ("" if hasattr(args, "overrides") else f" ({args.command} takes no a.b=c overrides)"))
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (one line on stderr, nothing written), 3 no GPU here: everything was checked
    but nothing ran (--dry-run asks for only the checks, and exits 0)."""
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except GptOssNemoError as e:
        if _rank0():  # every rank hits the same pre-flight check; say it once
            print(f"gptoss-nemo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_CHECKED_ONLY if isinstance(e, DeviceError) else EXIT_INPUT
