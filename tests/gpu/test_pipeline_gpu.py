"""GPU tier for the pipeline (issue 7): the quickstart (`gptoss-nemo pipeline recipes/tiny.yaml`) end to end on one
GPU, timed, its stage table printed; the same command again finds every stage done and runs nothing."""

import json
import time
from pathlib import Path

import pytest

from launch import EXTRA, IMPL_ARGS, result, run_python

pytestmark = pytest.mark.gpu
RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"


def test_quickstart_end_to_end(tmp_path):
    run = tmp_path / "tiny"
    start = time.perf_counter()
    r = run_python("-m", "gptoss_nemo", "pipeline", str(RECIPE), f"run_dir={run}", *EXTRA, *IMPL_ARGS, timeout=1200)
    seconds = time.perf_counter() - start
    summary = next(json.loads(line)["pipeline"] for line in r.stdout.splitlines() if line.startswith('{"pipeline"'))
    table = {row["stage"]: {"val_loss": row["val_loss"], "pass_rate": row["pass_rate"]} for row in summary["eval"]}
    print(r.stdout)
    result("quickstart pipeline (tiny, one GPU)", {"seconds": seconds, "table": table, "export": summary["export"]})
    assert set(summary["stages"].values()) == {"done"}, summary["stages"]
    assert list(table) == ["original", "sft", "ptq_mxfp4", "qat_mxfp4"]
    assert table["sft"]["val_loss"] < table["original"]["val_loss"]
    assert (run / "export" / "mxfp4" / "model.safetensors.index.json").is_file()
    again = run_python("-m", "gptoss_nemo", "pipeline", str(RECIPE), f"run_dir={run}", *EXTRA, *IMPL_ARGS, timeout=300)
    assert "pipeline: stage" not in again.stderr  # nothing left to run
