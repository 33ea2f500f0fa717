"""Starting the `gptoss-nemo` command (or a worker script) under torchrun from the GPU tests."""

import json
import os
import subprocess
import sys

import pytest


def torchrun_cmd(nproc: int, *args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}", *args]


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def torchrun(nproc: int, *args: str, port: int, timeout: int = 150) -> subprocess.CompletedProcess:
    """Run to completion; a non-zero exit or a hang fails the test with the ranks' output."""
    cmd = torchrun_cmd(nproc, *args, port=port)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\n{text[0][-3000:]}\n{text[1][-6000:]}")
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def json_line(r: subprocess.CompletedProcess, key: str) -> dict:
    """The `{"key": ...}` summary line a gptoss-nemo command prints."""
    return next(json.loads(line)[key] for line in r.stdout.splitlines() if line.startswith(f'{{"{key}"'))


def result(name: str, value) -> None:
    print(f"RESULT {name}: {json.dumps(value)}", flush=True)
