"""experiments/: a short end-to-end run, resume, pictures, predict and bad input."""
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_module("train")


def tiny_config(**overrides):
    sys.path.insert(0, os.path.join(EXPERIMENTS, "configs"))
    import tiny
    config = tiny.get_config()
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def trained(train, tmp_path_factory):
    """A tiny run of 4 steps, then a second invocation to step 6 that resumes."""
    workdir = tmp_path_factory.mktemp("run")
    first = train.train_and_evaluate(tiny_config(), workdir)
    second = train.train_and_evaluate(tiny_config(num_steps=6, eval_every=6), workdir)
    return workdir, first, second


def test_run_writes_checkpoints_metrics_and_pictures(trained):
    workdir, first, second = trained
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]  # keep_checkpoints=2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 6]
    assert 0 <= second["miou"] <= 1 and np.isfinite(second["loss"])
    for name in ("curves.png", "overlays.png"):
        assert (workdir / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(workdir / "tensorboard")


def test_second_invocation_resumed(trained, capsys):
    workdir, _, _ = trained
    from flaxbones.train.checkpoint import Checkpoints
    with Checkpoints(workdir / "checkpoints") as ckpt:
        meta = ckpt.read_meta()
        assert ckpt.latest_step == 6
    assert meta["model"] == "deeplabv3plus" and meta["model_kwargs"]["backbone"] == "mobilenet_v2_050"
    assert meta["config"]["num_steps"] == 6


def test_predict_writes_overlays_and_rejects_undecodable_files(trained, tmp_path):
    from PIL import Image
    workdir, _, _ = trained
    predict = load_module("predict")
    image = tmp_path / "shapes.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 36, 3), np.uint8)).save(image)
    [(path, overlay)] = predict.predict(workdir / "checkpoints", [str(image)], tmp_path / "out")
    assert overlay.read_bytes()[:4] == b"\x89PNG"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode .*broken.jpg"):
        predict.predict(workdir / "checkpoints", [str(image), str(broken)], tmp_path / "out")


def test_classifier_run_then_segmenter_warm_started_from_it(train, tmp_path, capsys):
    """A classification run (confusion-matrix picture), whose checkpoint's backbone starts
    a segmenter (experiments/configs/transfer_shapes_from_classifier.py's recipe)."""
    classifier = tiny_config(task="classification", model="resnet18", normalize_like="resnet18",
                             image_size=32, num_steps=2, eval_every=2, checkpoint_every=2,
                             log_every=1)
    classifier.model_kwargs = ml_collections.ConfigDict()
    result = train.train_and_evaluate(classifier, tmp_path / "cls")
    assert 0 <= result["top1"] <= 1
    assert (tmp_path / "cls" / "pictures" / "confusion.png").exists()
    segmenter = tiny_config(num_steps=1, eval_every=1, log_every=1,
                            init_from=str(tmp_path / "cls" / "checkpoints"))
    segmenter.model_kwargs.backbone = "resnet18"
    segmenter.normalize_like = "resnet18"
    train.train_and_evaluate(segmenter, tmp_path / "seg")
    assert "warm start from" in capsys.readouterr().out


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "train.py"),
         f"--config={os.path.join(EXPERIMENTS, 'configs', 'tiny.py')}", "--config.batch_sise=8",
         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode != 0
    assert "batch_sise" in result.stderr


def test_missing_dataset_says_how_to_prepare_it(train, tmp_path):
    config = tiny_config(dataset="oxford_iiit_pet", data_dir=str(tmp_path / "empty"))
    import flaxbones.data as fbd
    with pytest.raises(fbd.DatasetNotPreparedError, match="tfds build oxford_iiit_pet"):
        train.train_and_evaluate(config, tmp_path / "work")
