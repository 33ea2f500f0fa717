"""Progress of a long export on rank 0: BF16 bytes gathered so far of the model's total, rate and ETA.

    export: 12.4 / 233.8 GB (5.3%), 0.41 GB/s, ETA 8m55s

On a terminal the line is redrawn in place; otherwise (Slurm logs) one line is written every `every` seconds
and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

import torch


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_progress(done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    eta = _eta((total - done) / rate) if rate > 0 and done < total else "0m00s"
    return (f"export: {done / 1e9:.1f} / {total / 1e9:.1f} GB ({done / max(total, 1):.1%}), "
            f"{rate / 1e9:.2f} GB/s, ETA {eta}")


def with_progress(tensors: Iterable[tuple[str, torch.Tensor]], total_bytes: int, *, every: float = 10.0,
                  stream=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, tensor) through, counting each tensor's BF16 size against `total_bytes`."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    start = last = time.perf_counter()
    done = 0
    for name, t in tensors:
        yield name, t
        done += t.numel() * 2
        now = time.perf_counter()
        if now - last >= (0.5 if tty else every):
            last = now
            print(("\r" if tty else "") + format_progress(done, total_bytes, now - start), end="" if tty else "\n",
                  file=stream, flush=True)
    print(("\r" if tty else "") + format_progress(done, total_bytes, time.perf_counter() - start), file=stream,
          flush=True)
