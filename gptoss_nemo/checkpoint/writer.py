"""Writing Hugging Face checkpoints: safetensors shards with an index, into a directory that appears whole.

`atomic_dir(target)` yields a temporary directory beside `target` and renames it into place only when the
block finishes, so an interrupted write never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss_nemo.checkpoint.hf_layout import INDEX_FILE
from gptoss_nemo.errors import CheckpointError

DEFAULT_SHARD_BYTES = 5 * 1024**3
# where the output's file system refused the write (full, over quota, file too large, read-only, permission):
# reported as an input error, the partial output removed
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def check_target(target: str | Path, overwrite: bool = False, nbytes: int = 0) -> None:
    """Before any work is spent: refuse to write over a non-empty `target` unless asked to, a target that cannot be
    a directory (a file on its path, no write permission), and one whose file system has less than `nbytes` free
    (the output's size, when the caller knows it)."""
    target = Path(target)
    occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if occupied and not overwrite:
        raise CheckpointError(f"{target} already exists; choose a new directory or pass --overwrite")
    check_writable(target, nbytes)


def check_writable(target: str | Path, nbytes: int = 0) -> None:
    """`target` can be created (or written into) as a directory, with `nbytes` free on its file system."""
    target = Path(target)
    if "\n" in str(target):
        raise CheckpointError(f"{str(target)!r}: an output path with a newline in it; choose another output path")
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"{target}: {existing} is a file, so the output directory cannot be created there; "
                              "choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{target}: no write permission in {existing}; choose another output path")
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise CheckpointError(f"{target}: the output needs about {nbytes / 1024**3:.1f} GiB and its file system has "
                              f"{free / 1024**3:.1f} GiB free; free space or choose another output path")


def write_error(e: BaseException) -> OSError | None:
    """The file system's refusal (WRITE_ERRORS) behind `e`: an OSError itself, safetensors' error (which carries
    only the text "os error N"), torch.distributed.checkpoint's per-rank failures, or their causes."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in WRITE_ERRORS:
            return x
        code = re.search(r"os error (\d+)", str(x)) if type(x).__name__ == "SafetensorError" else None
        if code and int(code.group(1)) in WRITE_ERRORS:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        failures = getattr(x, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [x.__cause__, x.__context__]
    return None


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = write_error(e)
        if refused is None:
            raise
        raise CheckpointError(f"{target}: writing failed ({refused.strerror or refused}); the partial output was "
                              "removed: free space or choose another output path") from None


@contextlib.contextmanager
def collective_atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_dir` for every rank of a job: rank 0 owns the temporary directory and the rename, every rank gets
    its path; all ranks have finished writing before the rename, and `target` exists for all once it returns."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        tmp = [stack.enter_context(atomic_dir(target, overwrite=overwrite)) if rank0 else None]
        dist.broadcast_object_list(tmp, src=0)
        try:
            yield Path(tmp[0])
        except BaseException as e:  # rank 0's atomic_dir reports (and removes) a refused write; the others say it too
            refused = None if rank0 else write_error(e)
            if refused is None:
                raise
            raise CheckpointError(f"{target}: writing failed ({refused.strerror}); rank 0 removed the partial "
                                  "output: free space or choose another output path") from None
        dist.barrier()
    dist.barrier()


def _apply_umask(root: Path) -> None:
    """mkdtemp and safetensors create owner-only files; give the output the permissions the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, str]:
    """Stream (name, tensor) pairs into model-0000k-of-0000n.safetensors shards plus the index; return weight_map.

    A shard is written as soon as it is full, so at most one shard's tensors are held at a time.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush() -> None:
        path = out_dir / f"shard-{len(written) + 1:05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.contiguous()
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()
    weight_map: dict[str, str] = {}
    for k, (path, names) in enumerate(written, start=1):
        fname = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, out_dir / fname)
        weight_map.update({name: fname for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
