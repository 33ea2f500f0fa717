"""sbatch scripts for a stage command on N nodes, and their submission as a chain of dependent jobs.

One Slurm task per GPU runs `python -m gptoss_nemo STAGE ...` (no torchrun: parallel/setup.py takes the rank
from Slurm), inside the recipe's container through pyxis when one is given. The script:
  - requests nodes x GPUs, the time limit, partition and account; logs to RUN/logs/<job>-<id>.out (given on
    the sbatch command line);
  - sets MASTER_ADDR to the first node of the allocation, MASTER_PORT from the recipe, and the environment
    megatron expects (CUDA_DEVICE_MAX_CONNECTIONS=1 keeps TP/SP communication kernels in issue order);
  - asks Slurm for SIGUSR1 `stop_before_limit_s` before the time limit (also sent on preemption by sites that
    use it); the trap creates RUN/STOP, the training loop sees it at the next step boundary, writes a
    checkpoint and exits; the script then requeues the job, which resumes from that checkpoint;
  - quotes every value from the recipe or the command line (a path with spaces or `$(...)` stays a path).
Several stages are submitted in order, each with `--dependency=afterok:<previous job>`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from gptoss_nemo.config.cluster import ClusterConfig
from gptoss_nemo.errors import ConfigError

STOP_FILE = "STOP"  # in the run directory: a stop was requested (time limit, preemption, or by hand)
ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "8",
}


def _q(value) -> str:
    return shlex.quote(str(value))


def sbatch_script(cluster: ClusterConfig, run_dir: str | Path, command: Sequence[str], *, job_name: str,
                  workdir: str | Path, gpus: bool = True) -> str:
    """The batch script running `command` (argv of one task) on every task of the allocation, from `workdir`
    (where relative paths of the recipe resolve). gpus=False: a check such as `--dry-run`, on CPUs only, without
    the stop-and-requeue machinery."""
    run_dir, workdir = Path(run_dir).absolute(), Path(workdir).absolute()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={cluster.nodes}",
        f"#SBATCH --ntasks-per-node={cluster.gpus_per_node}",
        f"#SBATCH --time={cluster.time}",
        "#SBATCH --open-mode=append",
    ]
    if gpus:
        lines += [f"#SBATCH --gpus-per-node={cluster.gpus_per_node}", "#SBATCH --exclusive"]
    if cluster.partition:
        lines.append(f"#SBATCH --partition={cluster.partition}")
    if cluster.account:
        lines.append(f"#SBATCH --account={cluster.account}")
    requeue = gpus and cluster.requeue
    if requeue:
        lines.append("#SBATCH --requeue")
    if gpus and cluster.stop_before_limit_s:
        lines.append(f"#SBATCH --signal=B:USR1@{cluster.stop_before_limit_s}")
    env = {**ENV, **dict(e.split("=", 1) for e in cluster.env)}
    srun = ["srun", "--kill-on-bad-exit=1", "--export=ALL"]
    if cluster.container_image:
        srun += [f"--container-image={cluster.container_image}", f"--container-workdir={workdir}"]
        own = [workdir] + ([] if run_dir.is_relative_to(workdir) else [run_dir])
        mounts = [*cluster.container_mounts, *(f"{d}:{d}" for d in own)]
        srun.append(f"--container-mounts={','.join(mounts)}")
    lines += [
        "",
        "set -uo pipefail",
        f"RUN_DIR={_q(run_dir)}",
        'mkdir -p "$RUN_DIR/logs"',
        f"cd {_q(workdir)} || exit 1",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT={cluster.master_port}",
        *(f"export {name}={_q(value)}" for name, value in env.items()),
        f'export GPTOSS_NEMO_STOP_FILE="$RUN_DIR/{STOP_FILE}"',
        'rm -f "$GPTOSS_NEMO_STOP_FILE"',
        "# SIGUSR1 (time limit near, or preemption): ask the stage to checkpoint and stop at its next step",
        "trap 'touch \"$GPTOSS_NEMO_STOP_FILE\"' USR1",
        'echo "job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"',
        " ".join(_q(a) for a in [*srun, *command]) + " &",
        "SRUN_PID=$!",
        "# `wait` returns early when the trap runs; wait again until srun itself has ended",
        'while true; do wait "$SRUN_PID"; status=$?; kill -0 "$SRUN_PID" 2>/dev/null || break; done',
    ]
    if requeue:
        lines += [
            'if [ -e "$GPTOSS_NEMO_STOP_FILE" ] && [ "$status" -eq 0 ]; then',
            '  echo "stopped before the time limit; requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def sbatch_command(script: Path, run_dir: str | Path, after: str | None = None) -> list[str]:
    """argv that submits `script`. The log path goes here, not in an #SBATCH line (sbatch does not parse shell
    quoting there, and run directories may contain spaces)."""
    log = Path(run_dir).absolute() / "logs" / "%x-%j.out"
    cmd = ["sbatch", "--parsable", f"--output={log}"]
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    return [*cmd, str(script)]


def write_script(text: str, run_dir: str | Path, name: str) -> Path:
    path = Path(run_dir) / "launch" / f"{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit_chain(scripts: Sequence[Path], run_dir: str | Path) -> list[str]:
    """Submit in order, each job depending on the previous one succeeding; returns the job ids."""
    (Path(run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for script in scripts:
        cmd = sbatch_command(script, run_dir, after=ids[-1] if ids else None)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except FileNotFoundError:
            raise ConfigError("sbatch is not on PATH: run `gptoss-nemo launch` on a Slurm login node, or use "
                              "--print to see the scripts") from None
        except subprocess.CalledProcessError as e:
            raise ConfigError(f"sbatch refused {script}: {' '.join(e.stderr.split())[-300:]}") from None
        job = out.strip().split(";")[0]
        if not re.fullmatch(r"\d+", job):
            raise ConfigError(f"sbatch printed {out.strip()!r} for {script}, not a job id")
        ids.append(job)
    return ids
