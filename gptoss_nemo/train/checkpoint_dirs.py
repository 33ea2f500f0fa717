"""Where training checkpoints live, which one is the latest, and which ones to keep.

    RUN/checkpoints/step_0000100/   a complete checkpoint (appears by rename once every rank has written)
    RUN/checkpoints/latest          "step_0000100", replaced atomically after the rename

A checkpoint counts only once its directory has its final name; a crash while writing leaves a `.partial`
directory that nothing reads and the next save clears. If the process dies between the rename and the update of
`latest`, `find_latest` still finds the newest complete directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LATEST = "latest"
_STEP = re.compile(r"^step_(\d{7})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def complete_steps(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name)))


def find_latest(root: Path) -> int | None:
    """The step to resume from, or None for a fresh run."""
    steps = complete_steps(root)
    pointer = Path(root) / LATEST
    if pointer.is_file():
        m = _STEP.match(pointer.read_text().strip())
        if m and int(m.group(1)) in steps and int(m.group(1)) == max(steps):
            return int(m.group(1))
    return max(steps) if steps else None


def mark_latest(root: Path, step: int, keep_last: int) -> list[int]:
    """After step_dir(root, step) is complete: point `latest` at it and delete all but the newest `keep_last`
    complete checkpoints; returns the deleted steps. Leftover `.partial` directories are removed too."""
    root = Path(root)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(step_dir(root, step).name + "\n")
    os.replace(tmp, root / LATEST)
    steps = complete_steps(root)
    doomed = [s for s in steps if s != step][: max(0, len(steps) - max(keep_last, 1))]
    for s in doomed:
        shutil.rmtree(step_dir(root, s))
    for partial in root.glob(".step_*.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return doomed
