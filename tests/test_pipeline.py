"""The pipeline recipe and command (issue 7) on the CPU: the shipped recipes validate against their models and
clusters, every recipe mistake is named, the dry run plans without writing anything, finished stages are
recognised from their outputs, and without a GPU the command says so and runs the dry run."""

import json
from pathlib import Path

import pytest

from gptoss_nemo.cli import main
from gptoss_nemo.config.load import load_recipe
from gptoss_nemo.config.pipeline import PipelineRecipe
from gptoss_nemo.errors import ConfigError, DataError
from gptoss_nemo.model.impl import resolve_impl
from gptoss_nemo.model.presets import preset
from gptoss_nemo.plan.memory import GIB, estimate

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.mark.parametrize("name,model,gpu_gib,gpus,min_seq", [
    ("gpt_oss_20b", "gpt-oss-20b", 80, 8, 32768),
    ("gpt_oss_120b", "gpt-oss-120b", 80, 32, 8192),
    ("gpt_oss_120b_64gpu", "gpt-oss-120b", 80, 64, 32768),
    ("gpt_oss_120b_b200", "gpt-oss-120b", 180, 32, 8192),
    ("gpt_oss_20b_b200", "gpt-oss-20b", 180, 8, 32768)])
def test_shipped_recipes_validate_and_fit(name, model, gpu_gib, gpus, min_seq):
    """Each shipped recipe on its cluster, at the sequence length issue 23 asks of it, fits the planner's estimate
    with the memory savers it turns on (SFT and QAT stages)."""
    r = load_recipe(PipelineRecipe, RECIPES / f"{name}.yaml")
    cfg, world = preset(model), r.cluster.world_size
    assert world == gpus and r.data.seq_length >= min_seq, (world, r.data.seq_length)
    impl = resolve_impl(r.model.impl, layout=r.parallel, training=True, here=False)  # as the job's container will
    assert impl.name == ("te" if r.parallel.tp > 1 else "fused"), impl
    for stage, qat in ((r.sft_recipe(), False), (r.qat_recipe(), True)):  # QAT holds the fake-quantized experts too
        stage.check_layout(cfg, world, te=impl.te)
        stage.memory.check(impl.name, cfg, r.parallel, here=False)
        mem, _ = estimate(cfg, r.parallel, world, r.data.seq_length, stage.train.micro_batch_size, impl=impl.name,
                          qat=qat, savers=stage.memory)
        assert mem.total <= gpu_gib * GIB, mem.gib()
    assert r.cluster.container_image and r.export == ["mxfp4"] and r.qat.quant.format == "mxfp4"


def test_qat_table_recipes_chain():
    """The QAT/PTQ miniature: the base recipe exports MXFP4 where the table recipe reads its model; the table
    fine-tunes on another task than the base learned, at a fine-tuning rate, and keeps the PTQ baseline."""
    base = load_recipe(PipelineRecipe, RECIPES / "qat_table_base.yaml")
    table = load_recipe(PipelineRecipe, RECIPES / "qat_table.yaml")
    assert base.model.make_tiny and base.export == ["mxfp4"] and base.qat.quant.format == "mxfp4"
    assert Path(table.model.hf) == base.root / "export" / "mxfp4"
    assert base.data.train[0].startswith("synthetic:arithmetic:") and table.data.train[0].startswith(
        "synthetic:multiplication:") and table.eval.data[0].startswith("synthetic:multiplication:")
    assert table.ptq and table.sft.optimizer.lr <= 1e-4 < base.sft.optimizer.lr


def test_tiny_recipe_layout_and_stage_recipes():
    r = load_recipe(PipelineRecipe, RECIPES / "tiny.yaml", ["run_dir=/x"])
    assert r.model.make_tiny and r.hf_dir == Path("/x/hf-tiny")
    assert r.sft_recipe().checkpoint == "/x/import" and r.sft_recipe().train.out_dir == "/x/sft"
    q = r.qat_recipe()
    assert q.checkpoint == "/x/sft/checkpoints/step_0000250" and q.train.out_dir == "/x/qat" and q.optimizer.lr == 5e-5
    assert r.qat_recipe("ptq").train.out_dir == "/x/ptq"


@pytest.mark.parametrize("override,message", [
    ("model.hf=/some/dir", "exactly one of model.hf"),
    ("sft.train.out_dir=/elsewhere", "sft.train.out_dir is set by the pipeline"),
    ("export=[int4]", "export has 'int4'"),
    ("export=[nvfp4]", "an NVFP4 export needs an NVFP4 QAT"),
    ("qat.quant.format=nvfp4", "export has mxfp4 but QAT trains nvfp4"),
    ("eval.checker=bogus", "--checker 'bogus'"),
    ("qat.optimizer.lr=1e-3", "too high for QAT"),
    ("qat.quant.modules=[router]", "the router stays BF16"),
    ("sft.optimizer.warmup_steps=300", "optimizer.warmup_steps=300"),
    ("parallel.ep=3", None),  # valid recipe; refused against the model (8 experts) by the dry run below
])
def test_recipe_mistakes_are_named(override, message):
    if message is None:
        load_recipe(PipelineRecipe, RECIPES / "tiny.yaml", [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_recipe(PipelineRecipe, RECIPES / "tiny.yaml", [override])


def test_dry_run_plans_without_writing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pipeline", str(RECIPES / "tiny.yaml"), f"run_dir={run}", "--dry-run", "--local-spec"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
    assert plan["stages"] == {s: "to run" for s in ("hf", "import", "sft", "ptq", "qat", "export", "eval")}
    assert plan["data"]["lines"] == 4000 and plan["data"]["bad"] == 0 and plan["tokens_per_step"] == 16 * 512
    assert not run.exists()
    from gptoss_nemo.pipeline.run import dry_run  # the training data left to the stages that read it

    r = load_recipe(PipelineRecipe, RECIPES / "tiny.yaml", [f"run_dir={run}", "data.train=[missing.jsonl]"])
    assert "data" not in dry_run(r, data=False)
    with pytest.raises(DataError, match="missing.jsonl: no such data file"):
        dry_run(r)
    assert main(["pipeline", str(RECIPES / "tiny.yaml"), f"run_dir={run}", "parallel.ep=3", "--dry-run",
                 "--local-spec"]) == 2
    assert "ep=3" in capsys.readouterr().err


def test_finished_stages_are_recognised(tmp_path):
    from gptoss_nemo.pipeline.run import status

    r = load_recipe(PipelineRecipe, RECIPES / "tiny.yaml", [f"run_dir={tmp_path}", "ptq=false"])
    for path in (r.hf_dir, tmp_path / "import", r.sft_final()):
        path.mkdir(parents=True)
    assert status(r) == {"hf": "done", "import": "done", "sft": "done", "ptq": "off", "qat": "to run",
                         "export": "to run", "eval": "to run"}


def test_without_a_gpu_it_says_so_and_dry_runs(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the pipeline would run")
    # exit 3: everything was checked, nothing ran (a `&&` chain or CI stops); --dry-run asks for only the checks: 0
    assert main(["pipeline", str(RECIPES / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", "--local-spec"]) == 3
    out = capsys.readouterr()
    assert "no CUDA GPU here" in out.err and "exiting with 3" in out.err and len(out.err.strip().splitlines()) == 1
    assert '"dry_run"' in out.out and not (tmp_path / "run").exists()
    assert main(["pipeline", str(RECIPES / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", "--local-spec",
                 "--dry-run"]) == 0
    out = capsys.readouterr()
    assert '"dry_run"' in out.out and "tokens_per_conversation" in out.out and not out.err
    assert not (tmp_path / "run").exists()


def test_launch_prints_the_pipeline_job(tmp_path, capsys):
    assert main(["launch", "pipeline", str(RECIPES / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", "--print",
                 "--local-spec"]) == 0
    script = capsys.readouterr().out
    assert " pipeline " in script and "tiny.yaml" in script and "#SBATCH --nodes=1" in script
