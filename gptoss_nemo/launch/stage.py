"""`gptoss-nemo launch STAGE RECIPE [a.b=c ...] --print | --submit | --local [--dry-run]`.

The recipe (with its `cluster` section) is loaded and its layout checked against the allocation's world size
(nodes x GPUs per node) before anything is submitted. Then either the sbatch script is printed, or written to
RUN/launch/STAGE.sbatch and submitted, or (one node) the stage is run here under torchrun.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from gptoss_nemo.config.load import load_recipe, stage_keys
from gptoss_nemo.config.pipeline import PipelineRecipe
from gptoss_nemo.config.qat import QATRecipe
from gptoss_nemo.config.sft import SFTRecipe
from gptoss_nemo.errors import ConfigError, DeviceError
from gptoss_nemo.launch.slurm import sbatch_command, sbatch_script, submit_chain, write_script

STAGES = {"sft": SFTRecipe, "qat": QATRecipe, "ptq": QATRecipe, "pipeline": PipelineRecipe}


def check_allocation(recipe, world: int) -> None:
    """The recipe's layout against the allocation, for the implementation the job will run (model/impl.py,
    resolved for the job's container, not this login node)."""
    from gptoss_nemo.model.impl import resolve_impl
    from gptoss_nemo.train.sft import check_sequence_split

    te = resolve_impl(recipe.model.impl, layout=recipe.parallel, training=True, here=False).te
    check_sequence_split(recipe.data, recipe.parallel, te)
    if isinstance(recipe, PipelineRecipe):
        from gptoss_nemo.pipeline.run import hf_config

        with stage_keys("sft"):
            recipe.sft_recipe().check_layout(hf_config(recipe), world, te=te)
        return
    from gptoss_nemo.convert.dist_checkpoint import read_dist_checkpoint_config

    cfg, _ = read_dist_checkpoint_config(recipe.checkpoint)
    recipe.check_layout(cfg, world, te=te)


def check_visible(recipe: SFTRecipe, workdir: Path) -> None:
    """With a container, the stage sees only the working directory and the mounts: the recipe's paths must be
    inside them."""
    cluster = recipe.cluster
    if not cluster.container_image:
        return
    roots = [workdir, *(Path(m.split(":")[1]) for m in cluster.container_mounts)]
    source = ("model.hf", recipe.model.hf or recipe.run_dir) if isinstance(recipe, PipelineRecipe) else (
        "checkpoint", recipe.checkpoint)
    paths = [source, *((f"data.train[{i}]", p) for i, p in enumerate(recipe.data.train)),
             *((f"data.validation[{i}]", p) for i, p in enumerate(recipe.data.validation))]
    for key, value in paths:
        if value.startswith("synthetic:"):
            continue
        path = (workdir / value).absolute()
        if not any(path.is_relative_to(r) for r in roots):
            raise ConfigError(f"{key}={value} is outside the container's view ({workdir} and cluster.container_mounts"
                              f"): add a cluster.container_mounts entry host_path:container_path for it")


def stage_argv(stage: str, recipe_path: str | Path, overrides: list[str], *, dry_run: bool, impl: str) -> list:
    """`gptoss_nemo STAGE ...` arguments with the recipe path made absolute (jobs may start elsewhere) and the
    implementation asked for (the job resolves it in its own container)."""
    return [stage, str(Path(recipe_path).absolute()), *overrides, *(["--dry-run"] if dry_run else []),
            "--impl", impl]


def check_local_gpus(wanted: int) -> None:
    """--local runs one process per GPU of this node: they must be there (after every other check)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise DeviceError("--local runs the stage on this node's GPUs and no CUDA GPU is visible here; the recipe "
                          "and the allocation were checked: add --dry-run to check only, or --submit it to Slurm")
    if visible < wanted:
        raise ConfigError(f"cluster.gpus_per_node={wanted} but this node has {visible} GPU(s) visible to --local; "
                          f"set cluster.gpus_per_node={visible} (and a layout that fits it), or --submit it")


def launch(stage: str, recipe_path: str, overrides: list[str], *, mode: str, dry_run: bool = False,
           impl: str | None = None, local_spec: bool = False) -> None:
    from gptoss_nemo.model.impl import with_local_spec

    recipe = load_recipe(STAGES[stage], recipe_path, overrides)
    recipe.model.impl = with_local_spec(impl or recipe.model.impl, local_spec)
    cluster = recipe.cluster
    check_allocation(recipe, cluster.world_size)
    check_visible(recipe, Path.cwd())
    argv = stage_argv(stage, recipe_path, overrides, dry_run=dry_run, impl=recipe.model.impl)
    if mode == "local":
        if cluster.nodes != 1:
            raise ConfigError(f"--local runs on one node; the recipe asks for cluster.nodes={cluster.nodes} "
                              "(use --submit)")
        if not dry_run:
            check_local_gpus(cluster.gpus_per_node)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cluster.gpus_per_node}", "-m", "gptoss_nemo", *argv]
        print(shlex.join(cmd), flush=True)
        os.execv(cmd[0], cmd)
    run_dir = Path(recipe.run_dir if isinstance(recipe, PipelineRecipe) else recipe.train.out_dir).absolute()
    python = "python" if cluster.container_image else sys.executable  # the container's, or this environment's
    jobs = {stage: argv}
    if isinstance(recipe, PipelineRecipe) and not dry_run:
        # one job per stage still to run, each after the previous one succeeded (afterok): a stage that fails
        # stops the chain; a requeued stage keeps the later ones waiting
        from gptoss_nemo.pipeline.run import status

        todo = [s for s, st in status(recipe).items() if st == "to run"]
        jobs = {s: [*argv, "--only", s] for s in todo}
    scripts = {name: sbatch_script(cluster, run_dir, [python, "-m", "gptoss_nemo", *job],
                                   job_name=f"{cluster.job_name}-{name}", workdir=Path.cwd(), gpus=not dry_run)
               for name, job in jobs.items()}
    if mode == "print":
        after = None
        for name, script in scripts.items():
            path = run_dir / "launch" / f"{name}.sbatch"
            print(script)
            print(f"# written to {path} and submitted by `gptoss-nemo launch {stage} ... --submit` as:")
            print("# " + shlex.join(sbatch_command(path, run_dir, after=after)))
            after = f"<job id of {name}>"
        return
    ids = submit_chain([write_script(script, run_dir, name) for name, script in scripts.items()], run_dir)
    print(json.dumps({"submitted": {"stage": stage, "jobs": ids, "scripts": [str(run_dir / "launch" / f"{n}.sbatch")
                                                                             for n in scripts],
                                    "logs": str(run_dir / "logs")}}))
