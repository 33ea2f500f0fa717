"""The `gptoss-nemo` command. Each stage adds its subcommand here; the work lives in the stage's subpackage."""

from __future__ import annotations

import argparse
import sys

from gptoss_nemo import __version__
from gptoss_nemo.errors import GptOssNemoError


def _make_tiny(args: argparse.Namespace) -> int:
    from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_nemo.model.presets import tiny

    cfg = tiny(
        layers=args.layers, hidden=args.hidden, experts=args.experts, expert_width=args.expert_width,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, top_k=args.top_k,
    )
    path = write_tiny_checkpoint(args.out_dir, cfg, seed=args.seed, quantized=not args.bf16, overwrite=args.overwrite)
    layout = "BF16" if args.bf16 else "MXFP4"
    print(f"wrote {layout} gpt-oss checkpoint ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}) to {path}")
    return 0


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
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="write dequantized BF16 experts instead of MXFP4")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptOssNemoError as e:
        print(f"gptoss-nemo {args.command}: error: {e}", file=sys.stderr)
        return 2
