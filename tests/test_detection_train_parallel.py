"""Detection training sharded equals single-device: three Faster R-CNN train steps (the RPN's
balanced sampling from the same key, global BatchNorm) on 1 device vs 8 fake devices as a
4 (data) x 2 (fsdp) mesh. Each run is a fresh process (tests/detection_worker.py)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("detection_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detection")
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    env.pop("XLA_FLAGS", None)
    jobs = {"one": ["1", "jit"], "eight": ["8", "fsdp"]}
    procs = {name: subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"{name}.npz"), *a],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, a in jobs.items()}
    logs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"
    return {name: dict(np.load(tmp / f"{name}.npz")) for name in jobs}


def _mode(run, mode):
    return {k.split(":", 1)[1]: v for k, v in run.items() if k.startswith(mode + ":")}


def test_one_vs_eight_devices_fsdp(runs):
    """The same losses every step and the same state after three (BatchNorm biases, whose
    gradients are ~1e-5, measured against 1e-2)."""
    one, eight = _mode(runs["one"], "jit"), _mode(runs["eight"], "fsdp")
    assert set(one) == set(eight)
    losses = sorted(k for k in one if k.startswith("step"))
    assert {k.split(":")[1] for k in losses} >= {"loss_objectness", "loss_rpn_box_reg",
                                                 "loss_classifier", "loss_box_reg"}
    for k in losses:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, err_msg=k)
    state = [k for k in one if not k.startswith("step")]
    assert any(k.startswith("batch_stats/") for k in state)
    for k in state:
        err = np.abs(one[k] - eight[k]).max() / max(np.abs(one[k]).max(), 1e-2)
        assert err < 1e-4, f"{k}: error {err:.2e} of its scale"
