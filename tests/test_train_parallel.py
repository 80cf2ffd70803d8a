"""Sharded training equals single-device training: 1 vs 8 fake CPU devices, jit vs pmap,
per-device BatchNorm vs its pmap reference, FSDP, and 2 localhost processes x 2 devices
vs 1 process x 4 devices. Each run is a fresh process (tests/train_worker.py) so the
device count is set before jax is imported; all of them run concurrently."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("train_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT = 600


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    jobs = {
        "one": ["1", "jit"],
        "eight": ["8", "fsdp,jit,pmap,local,pmap_local"],
        "four": ["4", "jit"],
        "hosts": ["2", "jit", "2", "0", port],
        "hosts1": ["2", "jit", "2", "1", port],
    }
    procs = {name: subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"{name}.npz"), *args],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in jobs.items()}
    logs = {}
    try:
        for name, p in procs.items():
            logs[name] = p.communicate(timeout=TIMEOUT)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{logs.get(name, '')[-3000:]}"
    return {name: dict(np.load(tmp / f"{name}.npz")) for name in jobs if name != "hosts1"}


def _mode(run, mode):
    return {k.split(":", 1)[1]: v for k, v in run.items() if k.startswith(mode + ":")}


def assert_same_state(a, b, rtol=1e-4):
    """Every param and batch-stat leaf equal to fp32 tolerance (relative to its scale)."""
    assert set(a) == set(b)
    for k in a:
        if k == "loss":
            continue
        err = np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-6)
        assert err < rtol, f"{k}: relative error {err:.2e}"


def test_one_vs_eight_devices(runs):
    ref = _mode(runs["one"], "jit")
    assert any(k.startswith("batch_stats/") for k in ref)
    assert_same_state(ref, _mode(runs["eight"], "jit"))


def test_jit_vs_pmap(runs):
    assert_same_state(_mode(runs["eight"], "jit"), _mode(runs["eight"], "pmap"))
    assert_same_state(_mode(runs["one"], "jit"), _mode(runs["eight"], "pmap"))


def test_eval_jit_vs_pmap_with_padding(runs):
    one, jit, pmap = (_mode(runs[r], m) for r, m in
                      (("one", "eval-jit"), ("eight", "eval-jit"), ("eight", "eval-pmap")))
    assert set(one) == {"loss", "top1", "top5"}
    for k in one:
        np.testing.assert_allclose(jit[k], one[k], rtol=1e-4)
        np.testing.assert_allclose(pmap[k], one[k], rtol=1e-4)


def test_fsdp_sharded_params_match(runs):
    assert_same_state(_mode(runs["one"], "jit"), _mode(runs["eight"], "fsdp"))


def test_local_batchnorm_equals_per_device_pmap(runs):
    local, ref = _mode(runs["eight"], "local"), _mode(runs["eight"], "pmap_local")
    assert_same_state(ref, local)
    # per-device statistics really differ from global ones
    glob = _mode(runs["eight"], "jit")
    key = next(k for k in glob if k.startswith("batch_stats/") and k.endswith("var"))
    assert np.abs(glob[key] - local[key]).max() > 1e-3


def test_two_processes_match_one_process_four_devices(runs):
    assert_same_state(_mode(runs["four"], "jit"), _mode(runs["hosts"], "jit"))
    assert_same_state(_mode(runs["one"], "jit"), _mode(runs["four"], "jit"))


def test_bad_global_batch(runs):
    errors = runs["eight"]
    assert "not divisible by the 8 data shards" in str(errors["error:indivisible"])
    assert "same leading batch size" in str(errors["error:ragged"])
