"""experiments/: every config trains and evaluates, a run resumes, pictures, predict, bad input."""
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import re
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiment_runs import (CONFIGS, EXPERIMENTS, RCNN_TEST_SIZES, ROOT, TEST_MODEL_KWARGS,
                             at_test_size, dataset_of, load_config, load_module)

CONFIG_NAMES = sorted(p.stem for p in pathlib.Path(CONFIGS).glob("*.py") if p.stem != "common")
SHAPES = ("background", "circle", "square", "triangle")
# What a config test may not change: the run it describes, but for its sizes and data.
RECIPE = ("task", "model", "model_kwargs", "normalize_like", "num_classes", "optimizer",
          "precision", "aux_weight", "label_smoothing", "bn_mode", "init_from_model")


@pytest.fixture(scope="module")
def train():
    return load_module("train")


@pytest.fixture(scope="module")
def predict():
    return load_module("predict")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(train, data_dir, tmp_path_factory):
    """The tiny config as it is (4 steps), then a second invocation to step 6 that resumes."""
    workdir = tmp_path_factory.mktemp("run")
    first = train.train_and_evaluate(load_config("tiny", data_dir=data_dir), workdir)
    second = train.train_and_evaluate(
        load_config("tiny", data_dir=data_dir, num_steps=6, eval_every=6), workdir)
    return workdir, first, second


def torch_weights(name, directory):
    """A weight file of a freshly initialised torchvision (timm for Xception) `name`."""
    import timm
    import torch
    import torchvision
    from torch_ref import save_state
    torch.manual_seed(0)
    if name.startswith("xception"):
        model = timm.create_model(name)
    elif hasattr(torchvision.models.detection, name):  # a COCO detector, 91 classes
        model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)
    else:
        model = getattr(torchvision.models, name)()
    return save_state(model, directory / f"{name}.safetensors")


@pytest.fixture(scope="module")
def runs(train, data_dir, tmp_path_factory):
    """run(name) -> (workdir, final eval metrics) of config `name` at test size, run once
    per module. A weight file of `init_from_model` starts the configs that name one;
    transfer_shapes_from_classifier starts from shapes_classifier's checkpoints."""
    done = {}

    def run(name):
        if name not in done:
            config = at_test_size(name, data_dir)
            workdir = tmp_path_factory.mktemp(name)
            if name == "transfer_shapes_from_classifier":
                config.init_from = str(run("shapes_classifier")[0] / "checkpoints")
            elif config.init_from_model and not config.init_from:
                config.init_from = torch_weights(config.init_from_model, workdir)
            with dataset_of(config):
                done[name] = workdir, train.train_and_evaluate(config, workdir)
        return done[name]
    return run


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_trains_and_evaluates(name, runs, request, capsys):
    """Every experiments/configs file loads and runs its own model, task, optimizer and
    precision for two train steps and an evaluation, pictures included."""
    from flaxbones.train.checkpoint import Checkpoints
    if name == "tiny":  # already test-sized: the `trained` fixture ran it
        workdir, metrics, _ = request.getfixturevalue("trained")
    else:
        workdir, metrics = runs(name)
    config = load_config(name)
    with Checkpoints(workdir / "checkpoints") as ckpt:
        saved = ckpt.read_meta()["config"]
    original = json.loads(config.to_json())
    saved["model_kwargs"] = {k: v for k, v in saved["model_kwargs"].items()
                             if k in original["model_kwargs"]
                             or k not in {**RCNN_TEST_SIZES, **TEST_MODEL_KWARGS}}
    assert {k: saved[k] for k in RECIPE} == {k: original[k] for k in RECIPE}
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(np.isfinite([r["loss"], r.get("grad_norm", 0.0)]).all() for r in train_rows)
    assert not any(r.get("skipped") for r in rows)  # every update was applied
    score, picture = {"segmentation": ("miou", "overlays.png"),
                      "detection": ("bbox/AP", "detections.png")}.get(
                          config.task, ("top1", "confusion.png"))
    if config.task != "detection":  # detection evaluates COCO AP, not a loss
        assert np.isfinite(metrics["loss"])
    assert 0 <= metrics[score] <= 1
    for png in ("curves.png", picture):
        assert (workdir / "pictures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if config.init_from_model or name.startswith("transfer"):
        assert "warm start from" in capsys.readouterr().out


def test_sizes_are_an_int_or_a_pair_on_the_command_line(tmp_path):
    """`--config.eval_size` takes an int or (h, w) in the same config; a bad size is named."""
    script = ("import sys; sys.path.insert(0, 'experiments/configs')\n"
              "from absl import app\nfrom ml_collections import config_flags\n"
              "from common import pair\n"
              "C = config_flags.DEFINE_config_file('config')\n"
              "app.run(lambda _: print(pair(C.value.eval_size), pair(C.value.crop_size)))\n")
    config = os.path.join(CONFIGS, "cityscapes_deeplabv3plus_xception65.py")
    out = [subprocess.run([sys.executable, "-c", script, f"--config={config}", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
           for flags in ([], ["--config.eval_size=64"], ["--config.crop_size=(24, 40)"])]
    assert [o.stdout.strip() for o in out] == [
        "(1024, 2048) (769, 769)", "(64, 64) (769, 769)", "(1024, 2048) (24, 40)"], \
        [o.stderr[-500:] for o in out]
    common = importlib.import_module("common")
    with pytest.raises(ValueError, match="eval_size must be an int or"):
        common.pair((1, 2, 3), "eval_size")


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
    assert meta["model"] == "deeplabv3plus"
    assert meta["model_kwargs"]["backbone"] == "mobilenet_v2_050"
    assert meta["config"]["num_steps"] == 6


def test_overlays_draw_class_maps_in_the_legend_colours(tmp_path):
    """Ground truth and prediction are opaque class maps whose colours are exactly the
    legend's swatches (a purple square under the 'square' green must not read grey)."""
    from PIL import Image
    pictures = load_module("pictures")
    image = np.broadcast_to(np.uint8([145, 30, 180]), (32, 32, 3))
    truth = np.zeros((32, 32), np.int32)
    truth[8:24, 8:24] = 2
    truth[:, 28:] = 255
    pred = np.where(truth == 255, 0, truth)
    pred[:4, :4] = 1
    pictures.save_overlays(tmp_path / "o.png", image[None], truth[None], pred[None], list(SHAPES))
    png = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).reshape(-1, 3)
    entries = pictures.legend_entries([truth, pred], list(SHAPES))
    assert [name for name, _ in entries] == ["background", "circle", "square", "ignored"]
    for name, rgb in entries:  # a legend swatch alone is about 100 pixels
        assert (png == rgb).all(-1).sum() > 400, name
    assert len({tuple(rgb) for _, rgb in entries}) == len(entries)


def test_detection_pictures_draw_keypoints_and_the_coco_skeleton(tmp_path):
    """A person's 17 keypoints: each visible one a dot in its class colour, joined by COCO's
    skeleton; an invisible one (and its bones) left out."""
    from PIL import Image
    pictures = load_module("pictures")
    image = np.full((64, 64, 3), 40, np.uint8)
    points = np.zeros((1, 17, 3), np.float32)
    points[0, :, 0], points[0, :, 1], points[0, :, 2] = np.linspace(8, 56, 17), 32, 1
    points[0, 16, 2] = 0
    found = {"boxes": np.float32([[4, 4, 60, 60]]), "labels": np.int64([1]),
             "scores": np.float32([0.9]), "keypoints": points}
    pictures.save_detection_image(tmp_path / "k.png", image, found)
    png = np.asarray(Image.open(tmp_path / "k.png").convert("RGB"))
    s = pictures.magnification(64, 64)
    rgb = pictures.colour(1)
    near = lambda x, y: np.abs(png[int(y * s) - 2:int(y * s) + 3, int(x * s) - 2:int(x * s) + 3]
                               .astype(int) - rgb).sum(-1).min()
    assert near(*points[0, 0, :2]) < 60 and near(*points[0, 15, :2]) < 60
    assert near(points[0, 16, 0] + 1, 32) > 200  # invisible: no dot, no bone to it
    pictures.save_detections(tmp_path / "d.png", image[None], [found], [found])
    assert (tmp_path / "d.png").stat().st_size > 0


@pytest.mark.parametrize("hw", [(40, 36), (97, 131), (300, 200), (32, 32)])
def test_classifier_input_is_torchvisions_eval_transform(predict, hw):
    from PIL import Image
    from torchvision import transforms
    image = np.random.RandomState(0).randint(0, 255, (*hw, 3), np.uint8)
    want = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32)])(
        Image.fromarray(image))
    np.testing.assert_array_equal(predict.center_crop(image, 32), np.asarray(want))


def test_segmenter_input_fits_the_eval_size_and_maps_back(predict):
    image = np.zeros((20, 90, 3), np.uint8)
    assert predict.fit(image, (32, 48))[0].shape == (11, 48, 3)  # shrunk
    assert predict.fit(image[:10, :12], (32, 48))[1] == (32, 38)  # enlarged
    mask = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(predict.nearest(mask, (4, 6)), mask.repeat(2, 0).repeat(2, 1))


def images_of_three_sizes(directory):
    from PIL import Image
    from flaxbones.data import builtin
    paths = []
    for i, (h, w) in enumerate([(40, 36), (20, 90), (97, 131)]):
        image, _ = builtin.render(np.random.default_rng(i), max(h, w))
        paths.append(str(directory / f"image{i}.png"))
        Image.fromarray(image[:h, :w]).save(paths[-1])
    return paths


@contextlib.contextmanager
def traces_of(function_name, caplog):
    """The list of times jax traces `function_name` for jit, filled in the block."""
    traces = []
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        yield traces
        pattern = re.compile(rf"Finished tracing (\+ transforming )?{function_name} ")
        traces += [r for r in caplog.records if pattern.match(r.getMessage())]


def test_predict_segmenter_one_compile_masks_at_image_size(trained, predict, tmp_path, caplog):
    workdir, _, _ = trained
    paths = images_of_three_sizes(tmp_path)
    with traces_of("forward", caplog) as traces:
        results = predict.predict(workdir / "checkpoints", paths, tmp_path / "out")
    assert len(traces) == 1
    for result, (h, w) in zip(results, [(40, 36), (20, 90), (97, 131)]):
        assert result.mask.shape == (h, w) and set(np.unique(result.mask)) <= {0, 1, 2, 3}
        assert result.overlay.read_bytes()[:4] == b"\x89PNG"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode .*broken.jpg"):
        predict.predict(workdir / "checkpoints", [paths[0], str(broken)], tmp_path / "out")


def test_predict_classifier_top5_names_one_compile(runs, predict, tmp_path, caplog):
    workdir, _ = runs("shapes_classifier")
    paths = images_of_three_sizes(tmp_path)
    with traces_of("forward", caplog) as traces:
        results = predict.predict(workdir / "checkpoints", paths, tmp_path / "out", topk=5)
    assert len(traces) == 1
    for result in results:
        names, probs = zip(*result.top)
        assert sorted(names) == sorted(SHAPES)  # 4 classes: the top 5 are all of them
        assert list(probs) == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "train.py"),
         f"--config={os.path.join(CONFIGS, 'tiny.py')}", "--config.batch_sise=8",
         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode != 0
    assert "batch_sise" in result.stderr


def test_missing_dataset_says_how_to_prepare_it(train, tmp_path):
    config = load_config("tiny", dataset="oxford_iiit_pet", data_dir=str(tmp_path / "empty"))
    import flaxbones.data as fbd
    with pytest.raises(fbd.DatasetNotPreparedError, match="tfds build oxford_iiit_pet"):
        train.train_and_evaluate(config, tmp_path / "work")


def test_show_backbones_prints_the_table_and_a_classifier_check():
    result = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "show_backbones.py"), "--pattern", "resnet18",
         "--size", "64"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| resnet18 | 11.18M | C1 /2 x64 (32x32)" in result.stdout
    assert "logits (2, 10), finite: True" in result.stdout


def test_predict_detector_prints_and_draws_each_image_one_compile_per_bucket(
        runs, predict, tmp_path, caplog, capsys):
    """predict.py on a detection checkpoint: a line per image, then one per detection (name,
    score, box in the image's own pixels) best first, and a PNG per image at (a whole multiple
    of) its own size; two image sizes in one size bucket compile the detector once."""
    from absl import flags
    from PIL import Image

    import flaxbones as fb
    workdir, _ = runs("shapes_maskrcnn")
    capsys.readouterr()  # the training run's printout, when this test ran it
    paths = images_of_three_sizes(tmp_path)[::2]  # (40, 36) and (97, 131)
    sizes = [(40, 36), (97, 131)]
    buckets = {fb.detection.preprocess([np.zeros((*hw, 3), np.uint8)], min_size=64,
                                       max_size=64)[0].shape for hw in sizes}
    assert buckets == {(1, 64, 64, 3)}  # the at_test_size resize rule, 64 px
    flags.FLAGS([  # main's own flags; score 0 keeps all the model keeps (over its 0.05)
        "predict.py", f"--checkpoint={workdir / 'checkpoints'}", f"--output={tmp_path / 'out'}",
        "--score_thresh=0"])
    try:
        with traces_of("detector", caplog) as traces:
            predict.main(["predict.py", *paths])
    finally:
        flags.FLAGS.unparse_flags()
    assert len(traces) == 1
    out = capsys.readouterr().out
    heading = re.compile(r"(\S+): (\d+) detections? with score >= 0, drawn in (\S+)")
    detection = re.compile(r"  (circle|square|triangle) +(\d\.\d{3})  box \(([-\d., ]+)\)")
    blocks = [b.splitlines() for b in re.split(r"\n(?=\S)", out.strip())]
    assert [getattr(heading.fullmatch(b[0]), "group", str)(1) for b in blocks] == paths, out
    pictures = load_module("pictures")
    for (head, *lines), (h, w) in zip(blocks, sizes):
        count, png = heading.fullmatch(head).group(2, 3)
        assert 0 < int(count) == len(lines) <= 20, out  # the config's detections_per_img
        scores = []
        for line in lines:
            _, score, box = detection.fullmatch(line).groups()
            x0, y0, x1, y1 = map(float, box.split(", "))
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, line
            scores.append(float(score))
        assert scores == sorted(scores, reverse=True)
        s = pictures.magnification(h, w)
        assert s > 1 and Image.open(png).size == (w * s, h * s)


def test_predict_keypoint_detector_prints_and_draws_keypoints_in_the_image_frame(
        predict, tmp_path):
    """A Keypoint R-CNN through predict.py's detector path: each detection carries its
    (17, 3) keypoints mapped to the image's own pixels, printed after its box and drawn."""
    from PIL import Image
    from torch_ref import random_variables

    import flaxbones as fb
    model = fb.create_model("keypointrcnn", backbone="resnet18", num_classes=2,
                            fpn_channels=16, representation_size=32, keypoint_channels=8,
                            cpu_kernels=False, **RCNN_TEST_SIZES)
    images = [np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)]
    variables = random_variables(model, np.zeros((1, 64, 64, 3), np.float32),
                                 np.int32([[64, 64]]), scale=None, train=False)
    config = {"detection": {"min_size": 64, "max_size": 64}, "normalize_like": "resnet18",
              "dataset": "no_such_dataset", "num_classes": 2}
    [p] = predict.detect(model, variables, config, ["person.png"], images, tmp_path, 0.0)
    assert p.keypoints.shape == (len(p.detections), 17, 3) and len(p.detections) > 0
    assert (p.keypoints[..., 0] <= 80).all() and (p.keypoints[..., 1] <= 48).all()
    lines = predict.describe_detections(p, 0.0).splitlines()[1:]
    point = r"\((-?\d+),(-?\d+)\)"
    for line, points in zip(lines, p.keypoints):
        drawn = re.fullmatch(r"  class 1 +\d\.\d{3}  box \([-\d., ]+\)  keypoints (.*)",
                             line).group(1).split(" ")
        assert [tuple(map(int, re.fullmatch(point, d).groups())) for d in drawn] == [
            (round(x), round(y)) for x, y, _ in points], line
    assert Image.open(p.overlay).size[0] % 80 == 0


def test_detection_run_stopped_and_resumed_in_a_new_process_is_bit_identical(data_dir, tmp_path):
    """The detection demo's recipe at test size (constant learning rate, so a shorter run is a
    prefix of the longer one): 4 steps straight, or its step-2 checkpoint resumed in a new
    process for 2 more, end in identical variables: sampling keys, data position and
    optimizer state all resume."""
    import flaxbones as fb

    def run(workdir, steps):
        result = subprocess.run(
            [sys.executable, os.path.join(EXPERIMENTS, "train.py"),
             f"--config={os.path.join(CONFIGS, 'shapes_maskrcnn.py')}", f"--workdir={workdir}",
             f"--config.num_steps={steps}", "--config.batch_size=2",
             f"--config.data_dir={data_dir}",
             "--config.dataset=flaxbones_shapes/instances_tiny", "--config.detection.min_size=64",
             "--config.detection.max_size=64", "--config.detection.pad_size=64",
             "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
             "--config.log_every=1", "--config.eval_every=100", "--config.checkpoint_every=2",
             "--config.num_pictures=1"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(tmp_path / "straight", 4)
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    assert "resumed from step 2" in run(tmp_path / "resumed", 4)
    straight, resumed = (jax.tree.leaves(fb.load_pretrained(None, tmp_path / d / "checkpoints"))
                         for d in ("straight", "resumed"))
    assert len(straight) == len(resumed) > 100
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)


def test_two_hosts_train_as_one_run_with_the_coordinator_flags(trained, data_dir, tmp_path):
    """experiments/train.py --coordinator_address/--num_processes/--process_id: two
    processes of two CPU devices each (as on two hosts) train the tiny config as one run:
    the same final evaluation in both, one set of checkpoints and one metrics log."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    hosts = [subprocess.Popen(
        [sys.executable, os.path.join(EXPERIMENTS, "train.py"),
         f"--config={os.path.join(CONFIGS, 'tiny.py')}", f"--workdir={tmp_path}",
         f"--config.data_dir={data_dir}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    outs = [host.communicate(timeout=600) for host in hosts]
    for host, (_, err) in zip(hosts, outs):
        assert host.returncode == 0, err[-3000:]
    finals = [next(line for line in out.splitlines() if line.startswith("final eval"))
              for out, _ in outs]
    assert finals[0] == finals[1], finals
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("train", 2), ("train", 4), ("eval", 4)]
