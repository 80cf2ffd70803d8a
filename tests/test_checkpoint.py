"""Orbax checkpoints: exact resume, resharding, transfer, faults and preemption."""
import glob
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbones as fb
from flaxbones.weights import LoadReport
from flaxbones.train.checkpoint import CheckpointError, Checkpoints, abstract_state_like, transfer

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_worker.py")


def worker(*args, check=True, timeout=300):
    result = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def leaves(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_stop_and_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    worker("train", straight, "--until", 4, "--then", f"{resumed}:2")  # one process, two runs
    worker("train", resumed, "--until", 4)  # a new process resumes from step 2
    a, b = leaves(straight / "final_4.npz"), leaves(resumed / "final_4.npz")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, save_devices, restore_devices):
    worker("train", tmp_path, "--until", 2, "--devices", save_devices)
    worker("restore", tmp_path, "--devices", restore_devices)  # asserts the requested sharding
    for x, y in zip(leaves(tmp_path / "final_2.npz"),
                    leaves(tmp_path / f"restored_{restore_devices}.npz")):
        np.testing.assert_array_equal(x, y)


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    result = worker("kill-during-save", tmp_path, check=False)
    assert result.returncode == -signal.SIGKILL
    with Checkpoints(tmp_path) as ckpt:
        assert ckpt.steps == [1]
        assert ckpt.restore().data == 1


def _small_tree(seed):
    return {"w": jnp.full((4, 3), float(seed)), "b": jnp.arange(3.0) + seed}


def _truncate_array_files(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files
    for victim in files:
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])


def test_corrupted_checkpoint_names_the_step_and_can_fall_back(tmp_path):
    with Checkpoints(tmp_path, save_every=1) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _small_tree(step), data=step)
        ckpt.wait()
    _truncate_array_files(tmp_path / "2")
    abstract = abstract_state_like(_small_tree(0))
    with Checkpoints(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="checkpoint step 2 .* truncated or corrupted"):
            ckpt.restore(abstract)
        restored = ckpt.restore(abstract, fallback=True)
    assert restored.step == 1 and restored.data == 1
    np.testing.assert_array_equal(restored.state["w"], _small_tree(1)["w"])


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpoints("run/checkpoints", save_every=1) as ckpt:
        ckpt.save(1, _small_tree(1), data=1)
        ckpt.wait()
        assert ckpt.directory == tmp_path / "run" / "checkpoints"
    with Checkpoints("run/checkpoints") as ckpt:
        assert ckpt.restore(abstract_state_like(_small_tree(0))).step == 1


def test_retention_metrics_and_metadata(tmp_path):
    meta = {"model": "resnet18", "model_kwargs": {"num_classes": 4}, "config": {"lr": 0.1}}
    with Checkpoints(tmp_path, save_every=1, keep=2, best_metric="acc", meta=meta) as ckpt:
        for step, acc in enumerate([0.1, 0.9, 0.3, 0.2, 0.4], start=1):
            ckpt.save(step, _small_tree(step), data=step, metrics={"acc": acc})
        ckpt.wait()
        assert ckpt.steps == [2, 4, 5]  # the best (step 2) and the latest two
        saved = ckpt.read_meta(2)
    assert saved["model"] == "resnet18" and saved["config"] == {"lr": 0.1}
    assert saved["step"] == 2 and saved["metrics"] == {"acc": 0.9}
    assert saved["flaxbones_version"] == fb.__version__
    with pytest.raises(ValueError, match="lack the best_metric 'acc'"):
        Checkpoints(tmp_path / "x", best_metric="acc").save(1, _small_tree(1), metrics={"loss": 1})


def test_sigterm_checkpoints_the_current_step(tmp_path):
    proc = subprocess.Popen([sys.executable, WORKER, "sigterm", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step 3"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0
    stopped = int(rest.split("preempted at ")[1].split()[0])
    with Checkpoints(tmp_path) as ckpt:
        assert ckpt.latest_step == stopped >= 3
        restored = ckpt.restore()
    assert int(restored.state["step"]) == stopped and restored.data == stopped


def _classifier_checkpoint(directory, name="resnet18", **kwargs):
    model = fb.create_model(name, **kwargs)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
    state = {"step": jnp.array(5), "params": variables["params"],
             "batch_stats": variables["batch_stats"]}
    meta = {"model": name, "model_kwargs": kwargs}
    with Checkpoints(directory, meta=meta) as ckpt:
        ckpt.save(5, state, force=True)
    return variables


def test_load_pretrained_from_a_checkpoint_directory(tmp_path):
    saved = _classifier_checkpoint(tmp_path, num_classes=7)
    variables = fb.load_pretrained(None, tmp_path)  # model rebuilt from the metadata
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, variables, saved))
    with pytest.raises(ValueError, match="holds a 'resnet18' checkpoint, not 'resnet50'"):
        fb.load_pretrained("resnet50", tmp_path)


def test_checkpoint_directory_honours_skip_head_and_reports_like_a_weight_file(tmp_path):
    """skip_head and return_report act on a checkpoint as on a weight file: a head of
    another size keeps its initial values and the LoadReport says so; without skip_head
    the mismatch is an error naming the leaf."""
    saved = _classifier_checkpoint(tmp_path, num_classes=7)
    variables, report = fb.load_pretrained(None, tmp_path, num_classes=3, skip_head=True,
                                           return_report=True)
    assert isinstance(report, LoadReport)
    assert report.skipped == ["params/head/fc/bias", "params/head/fc/kernel"]
    assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 3)
    assert jax.tree_util.tree_all(jax.tree.map(
        np.array_equal, variables["params"]["backbone"], saved["params"]["backbone"]))
    _, report = fb.load_pretrained(None, tmp_path, return_report=True)
    assert isinstance(report, LoadReport) and not report.skipped
    with pytest.raises(ValueError, match="head/fc/kernel: saved"):
        fb.load_pretrained(None, tmp_path, num_classes=3)


def test_classifier_backbone_transfers_into_a_segmenter(tmp_path):
    saved = _classifier_checkpoint(tmp_path, num_classes=7)
    segmenter = fb.create_model("deeplabv3plus", backbone="resnet18", num_classes=3, style="tf")
    fresh = jax.jit(segmenter.init)(jax.random.PRNGKey(2), jnp.zeros((1, 32, 32, 3)))
    merged, report = transfer(tmp_path, fresh, subtrees=("backbone",))
    for collection in ("params", "batch_stats"):
        assert jax.tree_util.tree_all(jax.tree.map(
            np.array_equal, merged[collection]["backbone"], saved[collection]["backbone"]))
    assert jax.tree_util.tree_all(jax.tree.map(
        np.array_equal, merged["params"]["head"], fresh["params"]["head"]))
    assert "batch_stats/backbone/bn1/mean" in report.loaded
    assert report.skipped and all(k.split("/")[1] == "head" for k in report.skipped)
    assert len(report.loaded) + len(report.skipped) == len(jax.tree.leaves(fresh))
    other = jax.eval_shape(fb.create_model("resnet50").init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="shape mismatches"):
        transfer(tmp_path, other)


def test_two_processes_save_and_restore_one_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(tmp_path), "--devices", "2",
                               "--process", str(i), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, err[-3000:]
        assert f"process {i} restored step 3 equal True" in out
