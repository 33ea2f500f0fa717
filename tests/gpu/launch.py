"""Starting the `gptoss-nemo` command (or a worker script) under torchrun from the GPU tests."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[2] / "recipes"
IMPL = os.environ.get("GPU_TESTS_IMPL", "fused")  # the implementation the tier runs (model/impl.py): fused|te|reference
IMPL_ARGS = ["--impl", IMPL]
EXTRA = os.environ.get("GPU_TESTS_OVERRIDES", "").split()  # a.b=c added to every stage run (e.g. data.packing=false)
RECIPE = {"sft": RECIPES / "sft_tiny.yaml", "qat": RECIPES / "qat_tiny.yaml", "ptq": RECIPES / "qat_tiny.yaml"}


def torchrun_cmd(nproc: int, *args: str, port: int) -> list[str]:
    """$GPU_TESTS_PORT_OFFSET shifts every port, so pytest processes running at once on one machine do not meet."""
    port += int(os.environ.get("GPU_TESTS_PORT_OFFSET", "0"))
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}", *args]


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def torchrun(nproc: int, *args: str, port: int, timeout: int = 150) -> subprocess.CompletedProcess:
    """Run to completion; a non-zero exit or a hang fails the test with the ranks' output."""
    cmd = torchrun_cmd(nproc, *args, port=port)
    try:
        r = _run(cmd, timeout)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\n{text[0][-3000:]}\n{text[1][-6000:]}")
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """The command's output captured; with $GPU_TESTS_LOG_DIR set, also streamed to files there as it is written
    (a device call's time limit then still leaves what each run had done)."""
    log_dir = os.environ.get("GPU_TESTS_LOG_DIR")
    if not log_dir:
        return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(log_dir) / f"{time.strftime('%H%M%S')}-{os.getpid()}-{random.randrange(1000)}"
    out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        fo.write(" ".join(cmd) + "\n")
        fo.flush()
        rc = subprocess.run(cmd, stdout=fo, stderr=fe, text=True, env=env(), timeout=timeout).returncode
    return subprocess.CompletedProcess(cmd, rc, out.read_text().split("\n", 1)[1], err.read_text())


def json_line(r: subprocess.CompletedProcess, key: str) -> dict:
    """The `{"key": ...}` summary line a gptoss-nemo command prints."""
    return next(json.loads(line)[key] for line in r.stdout.splitlines() if line.startswith(f'{{"{key}"'))


def result(name: str, value) -> None:
    print(f"RESULT {name}: {json.dumps(value)}", flush=True)


def stage_args(stage: str, ckpt: Path, out: Path, *overrides: str, impl: str = IMPL) -> list[str]:
    """`python -m gptoss_nemo STAGE recipes/<stage recipe> checkpoint=... train.out_dir=... --impl IMPL`
    (TensorBoard only where it is installed)."""
    tb = "true" if importlib.util.find_spec("tensorboard") else "false"
    return ["-m", "gptoss_nemo", stage, str(RECIPE[stage]), f"checkpoint={ckpt}", f"train.out_dir={out}",
            f"train.tensorboard={tb}", *overrides, *EXTRA, "--impl", impl]


def run_python(*args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    """`python ARGS` as one process (a world of one, no torchrun); a non-zero exit fails the test."""
    r = _run([sys.executable, *args], timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def kill_at_random_step(args: list[str], out: Path, lo: int, hi: int, nproc: int = 1, port: int = 0
                        ) -> tuple[int, int]:
    """Start `python ARGS` (one process, its own session; nproc > 1: under torchrun), SIGKILL it once
    RUN/metrics.jsonl has a step >= a random one in [lo, hi]; returns (requested step, last step logged)."""
    from gptoss_nemo.train.metrics_log import read_metrics

    kill_at = random.Random(time.time_ns()).randint(lo, hi)
    cmd = [sys.executable, *args] if nproc == 1 else torchrun_cmd(nproc, *args, port=port)
    proc = subprocess.Popen(cmd, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r["step"] >= kill_at for r in read_metrics(metrics)):
            os.killpg(proc.pid, signal.SIGKILL)
            kill_matching(str(out))  # torchrun's workers run in sessions of their own
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before step {kill_at}"
    return kill_at, max(r["step"] for r in read_metrics(metrics))


def kill_matching(text: str) -> None:
    """SIGKILL every process (but this one) whose command line contains `text`."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def jobs_per_gpu() -> int:
    """$GPU_TESTS_JOBS_PER_GPU (default 1): one-GPU jobs `run_many` puts on a GPU at once. The tiny model leaves a
    GPU mostly idle, so more saves device time; step times measured then are not alone on the GPU."""
    return int(os.environ.get("GPU_TESTS_JOBS_PER_GPU", "1"))


def run_many(jobs: list[list[str]], timeout: int = 400) -> list[str]:
    """Run `python ARGS` for each job as one process, `jobs_per_gpu()` per GPU at once (each on its own free
    port); returns their stdouts in order. Any non-zero exit fails the test with its output."""
    import torch

    gpus = max(torch.cuda.device_count(), 1)
    slots = gpus * jobs_per_gpu()
    outputs: list[str] = [""] * len(jobs)
    for start in range(0, len(jobs), slots):
        procs = []
        for slot, i in enumerate(range(start, min(start + slots, len(jobs)))):
            procs.append((i, subprocess.Popen([sys.executable, *jobs[i]],
                                              env={**env(), "CUDA_VISIBLE_DEVICES": str(slot % gpus)},
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for i, proc in procs:
            outputs[i] = wait_ok(proc, timeout)
    return outputs


def wait_ok(proc: subprocess.Popen, timeout: int) -> str:
    """The stdout of a started process (text, pipes) once it exits 0; a non-zero exit, or a hang (killed after
    `timeout` s), fails the test with the command and its output."""
    cmd = " ".join(map(str, proc.args))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{cmd} hung for {timeout} s\n{out[-2000:]}\n{err[-8000:]}")
    assert proc.returncode == 0, f"{cmd}\n{out[-2000:]}\n{err[-8000:]}"
    return out
