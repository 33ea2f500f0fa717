"""MXFP4 export writer throughput and peak memory on synthetic gpt-oss-120b-shaped layers (real widths, 128
experts): the part of `gptoss-nemo export --format mxfp4` that runs on rank 0 after the gather (quantize the
experts, write safetensors shards). Weights are random BF16, generated one layer at a time (generation time is
not counted). Prints one JSON line.

    python benchmarks/export_mxfp4.py --layers 2 [--experts 128 --hidden 2880 --intermediate 2880 --shard-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gptoss_nemo.checkpoint.writer import write_shards
from gptoss_nemo.convert.to_mxfp4 import to_mxfp4


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def experts(e: int, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Random BF16 [e, rows, cols], filled expert by expert (no full-size FP32 temporary to inflate the peak)."""
    out = torch.empty(e, rows, cols, dtype=torch.bfloat16)
    for j in range(e):
        out[j] = torch.randn(rows, cols, generator=g) * 0.02
    return out


def layer(i: int, e: int, h: int, inter: int, heads: int, kv: int, d: int, g: torch.Generator):
    """One layer's tensors in the HF BF16 layout (names as openai/gpt-oss)."""
    p = f"model.layers.{i}."
    bf = dict(dtype=torch.bfloat16)
    yield p + "self_attn.q_proj.weight", torch.randn(heads * d, h, generator=g, **bf)
    yield p + "self_attn.k_proj.weight", torch.randn(kv * d, h, generator=g, **bf)
    yield p + "self_attn.v_proj.weight", torch.randn(kv * d, h, generator=g, **bf)
    yield p + "self_attn.o_proj.weight", torch.randn(h, heads * d, generator=g, **bf)
    yield p + "mlp.router.weight", torch.randn(e, h, generator=g, **bf)
    yield p + "mlp.experts.gate_up_proj", experts(e, h, 2 * inter, g)
    yield p + "mlp.experts.gate_up_proj_bias", torch.zeros(e, 2 * inter, **bf)
    yield p + "mlp.experts.down_proj", experts(e, inter, h, g)
    yield p + "mlp.experts.down_proj_bias", torch.zeros(e, h, **bf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--intermediate", type=int, default=2880)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    generating = 0.0
    input_bytes = 0

    def source():
        nonlocal generating, input_bytes
        for i in range(args.layers):
            it = layer(i, args.experts, args.hidden, args.intermediate, 64, 8, 64, g)
            while True:
                t0 = time.perf_counter()
                item = next(it, None)
                generating += time.perf_counter() - t0
                if item is None:
                    break
                input_bytes += item[1].numel() * item[1].element_size()
                yield item

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as out:
        start = time.perf_counter()
        write_shards(to_mxfp4(source()), Path(out), max_shard_bytes=int(args.shard_gib * 1024**3))
        total = time.perf_counter() - start - generating
        written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(json.dumps({
        "benchmark": "export_mxfp4_writer", "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
        "intermediate": args.intermediate, "shard_gib": args.shard_gib, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "bf16_input_gb": round(input_bytes / 1e9, 3),
        "written_gb": round(written / 1e9, 3), "seconds": round(total, 2),
        "gb_per_s": round(input_bytes / 1e9 / total, 4), "peak_rss_gib": round(peak_rss_gib(), 2)}))


if __name__ == "__main__":
    main()
