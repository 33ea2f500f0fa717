"""`gptoss-nemo launch`: the sbatch script it writes (headers, quoting, the stop-and-requeue path), executed with
stand-ins for srun/scontrol, and the checks made before anything is submitted."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckpt_meta import write_ckpt_meta

from gptoss_nemo.cli import main
from gptoss_nemo.config.cluster import ClusterConfig
from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.errors import ConfigError
from gptoss_nemo.launch.slurm import sbatch_command, sbatch_script
from gptoss_nemo.model.presets import preset

RECIPE = Path(__file__).parents[1] / "recipes" / "sft_tiny.yaml"
HOSTILE = "run dir $(touch PWNED) `touch PWNED2` 'q\""


@pytest.fixture(scope="module")
def ckpt_120b(tmp_path_factory):
    """What launch reads of a gptoss-nemo checkpoint: its metadata and model config (gpt-oss-120b shape)."""
    return write_ckpt_meta(tmp_path_factory.mktemp("launch") / "ckpt-120b", preset("gpt-oss-120b"))


def _fake_slurm(bin_dir: Path) -> Path:
    """srun records its argv (one JSON list per call) and runs nothing; scontrol answers like Slurm."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\npython3 -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' "$@" '
                                  '>> "$FAKE_LOG"\nsleep "${FAKE_SRUN_SECONDS:-0}"\nexit "${FAKE_SRUN_STATUS:-0}"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo node-a; echo node-b; '
                                      'else echo "scontrol $*" >> "$FAKE_LOG.scontrol"; fi\n')
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    return bin_dir


def _run_script(script: str, tmp_path: Path, **env) -> subprocess.Popen:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    bin_dir = _fake_slurm(tmp_path / "bin")
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "srun.log"),
            "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", **env}
    return subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_script_headers_and_container():
    cluster = ClusterConfig(nodes=4, gpus_per_node=8, partition="batch", account="llm", time="1-00:00:00",
                            container_image="nvcr.io#nvidia/nemo:25.11", container_mounts=["/lustre:/lustre"],
                            env=["NCCL_IB_HCA=mlx5"])
    text = sbatch_script(cluster, "/lustre/runs/a", ["python", "-m", "gptoss_nemo", "sft", "r.yaml"],
                         job_name="gptoss-nemo-sft", workdir="/lustre/work")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --partition=batch", "#SBATCH --account=llm",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600", "export MASTER_PORT=29500",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export NCCL_IB_HCA=mlx5"):
        assert line in text.splitlines(), line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "'--container-image=nvcr.io#nvidia/nemo:25.11'" in srun
    assert "--container-mounts=/lustre:/lustre,/lustre/work:/lustre/work,/lustre/runs/a:/lustre/runs/a" in srun
    cpu = sbatch_script(ClusterConfig(gpus_per_node=2), "/r", ["true"], job_name="x", workdir="/w", gpus=False)
    assert "--gpus-per-node" not in cpu and "--container" not in cpu and "--signal" not in cpu and "requeue" not in cpu
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_hostile_paths_stay_paths(tmp_path):
    run_dir = tmp_path / HOSTILE
    argv = ["python", "-m", "gptoss_nemo", "sft", str(tmp_path / "my recipe.yaml"), f"train.out_dir={run_dir}"]
    text = sbatch_script(ClusterConfig(gpus_per_node=2), run_dir, argv, job_name="x", workdir=tmp_path)
    proc = _run_script(text, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = [json.loads(line) for line in (tmp_path / "srun.log").read_text().splitlines()]
    assert calls == [["--kill-on-bad-exit=1", "--export=ALL", *argv]]
    assert not list(tmp_path.rglob("PWNED*")) and (run_dir / "logs").is_dir()
    assert "master node-a:29500" in out
    cmd = sbatch_command(run_dir / "launch" / "sft.sbatch", run_dir, after="17")
    assert cmd[2] == f"--output={run_dir}/logs/%x-%j.out" and cmd[3] == "--dependency=afterok:17"


def test_stop_signal_requeues_after_a_clean_stop(tmp_path):
    text = sbatch_script(ClusterConfig(gpus_per_node=1), tmp_path / "run", ["true"], job_name="x", workdir=tmp_path)
    proc = _run_script(text, tmp_path, FAKE_SRUN_SECONDS="3")
    while not (tmp_path / "srun.log").exists():  # srun has started
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 does before the time limit
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "run" / "STOP").exists()
    assert (tmp_path / "srun.log.scontrol").read_text() == "scontrol requeue 4242\n"
    # a failed stage is not requeued, and its status is the job's
    (tmp_path / "srun.log").unlink()
    (tmp_path / "srun.log.scontrol").unlink()
    proc = _run_script(text, tmp_path, FAKE_SRUN_STATUS="3")
    proc.communicate(timeout=30)
    assert proc.returncode == 3 and not (tmp_path / "srun.log.scontrol").exists()


@pytest.mark.parametrize("overrides, message", [
    (["cluster.time=3h"], "cluster.time='3h' is not a Slurm time limit"),
    (["cluster.time=00:15:00", "cluster.stop_before_limit_s=600"], "must be >= 0 and under half of cluster.time"),
    (["cluster.container_mounts=[/data]"], "must be host_path:container_path"),
    (["cluster.env=[1X=2]"], "must be NAME=value"),
    (["cluster.partition=a b"], "cluster.partition='a b': use letters, digits"),
    (["cluster.gpus_per_node=3", "parallel.ep=8"], "world size 3 / pp=1 is not divisible by ep=8"),
    (["cluster.nodes=2", "cluster.gpus_per_node=8", "train.global_batch_size=16", "train.micro_batch_size=4"],
     "train.global_batch_size=16 is not a multiple of train.micro_batch_size=4 x data-parallel size 16"),
    (["cluster.container_image=img", "cluster.container_mounts=[/tmp:/tmp]", "data.train=[/elsewhere/chats.jsonl]"],
     "data.train[0]=/elsewhere/chats.jsonl is outside the container's view"),
])
def test_refused_before_submission(ckpt_120b, tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    argv = ["launch", "sft", str(RECIPE), f"checkpoint={ckpt_120b}", f"train.out_dir={tmp_path / 'run'}",
            *overrides, "--submit"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_submit_without_slurm_says_so(ckpt_120b, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["launch", "sft", str(RECIPE), f"checkpoint={ckpt_120b}", "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_print_is_the_script_that_submit_writes(ckpt_120b, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["launch", "sft", str(RECIPE), f"checkpoint={ckpt_120b}", f"train.out_dir={tmp_path / 'run'}"]
    assert main([*args, "--print"]) == 0
    printed = capsys.readouterr().out
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/sbatch.args"\necho "77;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert main([*args, "--submit"]) == 0
    submitted = json.loads(capsys.readouterr().out)["submitted"]
    (script,) = map(Path, submitted["scripts"])
    assert submitted["jobs"] == ["77"] and printed.startswith(script.read_text())
    assert (fake / "sbatch.args").read_text().split() == [
        "--parsable", f"--output={tmp_path / 'run'}/logs/%x-%j.out", str(script)]
    recipe = load_recipe(SFTRecipe, RECIPE, [f"checkpoint={ckpt_120b}"])
    assert f"--ntasks-per-node={recipe.cluster.gpus_per_node}" in printed


def test_pipeline_submits_one_job_per_stage_left_chained_afterok(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    # a fake sbatch: job ids 100, 101, ... and every call's arguments kept
    (fake / "sbatch").write_text('#!/bin/bash\nn=$(ls "$(dirname "$0")" | grep -c args)\n'
                                 'echo "$@" > "$(dirname "$0")/args.$n"\necho "$((100 + n))"\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    run = tmp_path / "run"
    (run / "hf-tiny").mkdir(parents=True)  # the first stage is done: it gets no job
    (run / "hf-tiny" / "config.json").write_text("{}")
    recipe = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    monkeypatch.setattr("gptoss_nemo.pipeline.run.hf_config", lambda r: __import__(
        "gptoss_nemo.model.presets", fromlist=["tiny"]).tiny())
    assert main(["launch", "pipeline", str(recipe), f"run_dir={run}", "--submit", "--local-spec"]) == 0
    submitted = json.loads(capsys.readouterr().out)["submitted"]
    stages = ["import", "sft", "ptq", "qat", "export", "eval"]
    assert submitted["jobs"] == [str(100 + i) for i in range(6)]
    assert [Path(s).stem for s in submitted["scripts"]] == stages
    for i, stage in enumerate(stages):
        args = (fake / f"args.{i}").read_text().split()
        assert (f"--dependency=afterok:{99 + i}" in args) == (i > 0)
        assert f"--only {stage}" in (run / "launch" / f"{stage}.sbatch").read_text()


def test_local_needs_one_node(ckpt_120b, capsys):
    assert main(["launch", "sft", str(RECIPE), f"checkpoint={ckpt_120b}", "cluster.nodes=2", "--local"]) == 2
    assert "--local runs on one node" in capsys.readouterr().err


def test_cluster_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="cluster.nodes=0"):
        ClusterConfig(nodes=0)


def test_ranks_from_slurm_inside_srun_steps_only(monkeypatch):
    from gptoss_nemo.parallel import setup

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    monkeypatch.setattr(os, "environ", env)  # a private environment: the mapping writes into it
    assert (setup.env_rank(), setup.env_world_size()) == (0, 1)  # the batch script itself, not an srun step
    env["SLURM_STEP_ID"] = "0"
    assert (setup.env_rank(), setup.env_world_size()) == (5, 16)
    with pytest.raises(ConfigError, match="srun step without MASTER_ADDR"):
        setup._torch_env_from_slurm()
    env["MASTER_ADDR"] = "node-a"
    setup._torch_env_from_slurm()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    env["RANK"] = "2"  # torchrun's variables win when present
    assert setup.env_rank() == 2
