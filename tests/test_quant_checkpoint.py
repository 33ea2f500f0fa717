"""QAT / PTQ checkpoints keep their quantizers (issue 5): a model quantized with ModelOpt (MXFP4 and NVFP4 presets)
is saved with save_dist_checkpoint (weights + `_extra_state` + CKPT/modelopt_state/, metadata "quant") and
load_dist_checkpoint re-creates the same quantizers (NVFP4: the same calibrated amax) and weights in a fresh
model. CPU, gloo, megatron's SequentialMLP experts (quant_checkpoint_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("quant_checkpoint_worker.py")


@pytest.mark.parametrize("fmt,port", [("mxfp4", "29641"), ("nvfp4", "29642")])
def test_quantizers_survive_save_and_load(fmt, port, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(WORKER), fmt, str(tmp_path / "ckpt"), port], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["quantized"] and got["experts"] == got["expected"] and len(got["experts"]) == 8  # 4 x fc1, fc2
    assert got["weights_equal"] and got["quantizers_equal"] and got["amax_equal"]
    assert got["has_amax"] == (fmt == "nvfp4")  # NVFP4's per-tensor amax is calibrated state; MXFP4 has none
    if fmt == "nvfp4":  # shared by the 4 experts of each projection
        assert all(len(v) == 1 for v in got["amax_values"].values()), got["amax_values"]
    assert {"modelopt_state", "gptoss_nemo.json", "hf"} <= set(got["files"])
    meta = json.loads((tmp_path / "ckpt" / "gptoss_nemo.json").read_text())
    assert meta["quant"] == {"format": fmt, "stage": "ptq"}
