"""A real Slurm job: `gptoss-nemo launch sft ... --dry-run --submit` on the one-node cluster `.ci/slurm-up` starts
(2 tasks, CPU only). Skipped where no Slurm controller answers."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gptoss_nemo.cli import main


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "UP" in ping.stdout


# .ci/run starts Slurm (as root) and sets GPTOSS_NEMO_CI_SLURM=1: then this test must run, not skip.
pytestmark = pytest.mark.skipif(os.environ.get("GPTOSS_NEMO_CI_SLURM") != "1" and not _slurm_up(),
                                reason="needs a running Slurm controller (.ci/slurm-up)")
RECIPE = Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml"


def _wait(job: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        if fields.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not finish in {timeout} s")


def _submitted_plan(stage: str, run: Path, out: str) -> dict:
    """Wait for the job `launch --submit` printed; it must complete; the one dry-run plan its log holds (rank 0)."""
    job = json.loads(out)["submitted"]["jobs"][0]
    state = _wait(job)
    log = run / "logs" / f"gptoss-nemo-{stage}-{job}.out"
    text = log.read_text() if log.is_file() else "(no log)"
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-3000:])
    plans = [json.loads(line)["dry_run"] for line in text.splitlines() if line.startswith('{"dry_run"')]
    assert len(plans) == 1, text[-3000:]  # rank 0 only
    assert "master " in text
    return plans[0]


def test_dry_run_job_with_two_tasks(tiny_ckpt_meta, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run dir"  # a space: the path must survive the script, sbatch and srun
    assert main(["launch", "sft", str(RECIPE), f"checkpoint={tiny_ckpt_meta}", f"train.out_dir={run}",
                 "data.train=[synthetic:arithmetic:64]", "cluster.gpus_per_node=2", "parallel.ep=2",
                 "cluster.time=00:15:00", "cluster.stop_before_limit_s=60", "--dry-run", "--submit",
                 "--local-spec"]) == 0
    plan = _submitted_plan("sft", run, capsys.readouterr().out)
    assert plan["world_size"] == 2 and plan["data_parallel"] == 2 and plan["layout"] == {"tp": 1, "ep": 2, "pp": 1, "cp": 1}
    assert plan["data"]["lines"] == 64 and plan["data"]["bad"] == 0 and plan["micro_batches_per_step"] == 2
    assert "--requeue" not in (run / "launch" / "sft.sbatch").read_text()


def test_pipeline_dry_run_job(tmp_path, capsys, monkeypatch):
    """The pipeline's --dry-run as a 2-task Slurm job: the recipe resolved, the layout checked against the world
    size Slurm gives, the data read, the plan printed once."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "pipe $(run)"  # a path that looks like a command substitution stays a path
    recipe = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    assert main(["launch", "pipeline", str(recipe), f"run_dir={run}", "data.train=[synthetic:arithmetic:64:0:1]",
                 "cluster.gpus_per_node=2", "parallel.ep=2", "cluster.time=00:15:00", "cluster.stop_before_limit_s=60",
                 "--dry-run", "--submit", "--local-spec"]) == 0
    plan = _submitted_plan("pipeline", run, capsys.readouterr().out)
    assert plan["world_size"] == 2 and plan["layout"] == {"tp": 1, "ep": 2, "pp": 1, "cp": 1} and plan["data"]["lines"] == 64
    assert set(plan["stages"].values()) == {"to run"} and not (run / "hf-tiny").exists()  # a dry run writes nothing
