"""Inference on image files: `fb.preprocess` against torchvision's / timm's own eval
transforms, the eval transforms of every registered name against the references' default
weights, the class names shipped as data, and predict.py from weight files (top-5 names equal
torchvision's prediction; segmentation overlays at each image's size; one compile per size)."""
import json
import pathlib
import re
import tomllib

import numpy as np
import pytest

import flaxbones as fb

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from torchvision.models import get_model_weights  # noqa: E402

from experiment_runs import load_module  # noqa: E402  (predict.py's flags: once a process)
from test_experiments import traces_of  # noqa: E402
from torch_ref import randomize, save_state  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (h, w), PIL mode, format: odd sizes, landscape and portrait, grayscale and RGBA, PNG and JPEG
FILES = {"photo.jpg": ((70, 95), "RGB"), "scan.png": ((97, 131), "RGB"),
         "gray.png": ((131, 97), "L"), "logo.png": ((45, 61), "RGBA"),
         "gray.jpg": ((101, 75), "L"), "wide.png": ((128, 192), "RGB")}
# flaxbones names that timm spells otherwise
TIMM_NAMES = {"mobilenet_v1": "mobilenetv1_100", "xception": "legacy_xception"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files written with Pillow: smooth colour fields with a few blobs and some noise,
    different per file, so a classifier tells them apart."""
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, ((h, w), mode) in FILES.items():
        y, x = np.mgrid[:h, :w] / max(h, w)
        field = np.stack([np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6) * y + rng.uniform(0, 6))
                          for _ in range(4)], -1)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, 1, 3)
            field[(y - cy * h / max(h, w)) ** 2 + (x - cx * w / max(h, w)) ** 2 < (r / 4) ** 2] = \
                rng.uniform(-1, 1, 4)
        rgba = np.clip(127.5 * (field + 1) + rng.normal(0, 8, field.shape), 0, 255)
        image = Image.fromarray(rgba.astype(np.uint8), "RGBA").convert(mode)
        paths.append(str(directory / name))
        image.save(paths[-1], **({"quality": 90} if name.endswith(".jpg") else {}))
    return paths


def _reference(transform, path) -> np.ndarray:
    """torchvision's / timm's transform on the file as torchvision's loaders open it, NHWC."""
    with Image.open(path) as image:
        return transform(image.convert("RGB")).permute(1, 2, 0).numpy()[None]


def _timm_transform(name):
    from timm.data import create_transform, resolve_data_config
    cfg = timm.models.get_pretrained_cfg(TIMM_NAMES.get(name, name)).to_dict()
    return create_transform(**resolve_data_config(pretrained_cfg=cfg))


# resize 256 -> 224 bilinear; 255 -> 240 bilinear; 320 -> 300 bicubic; 260 -> 256 bicubic;
# timm's 269 -> 256 bicubic and 384 squashed; segmentation 520; detection [0, 1].
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b1", "efficientnet_b3",
                                  "swin_v2_t", "resnet101d", "convnextv2_huge",
                                  "lraspp_mobilenet_v3_large", "fasterrcnn_resnet50_fpn"])
def test_preprocess_equals_the_reference_transform(files, name):
    transform = (_timm_transform(name) if fb.get_spec(name).weights.name == "timm"
                 else get_model_weights(name).DEFAULT.transforms())
    batch = fb.preprocess(files, name)
    if "lraspp" in name or "rcnn" in name:  # no crop: each image keeps its aspect
        assert isinstance(batch, list) and len(batch) == len(files)
    for path, got in zip(files, batch):
        want = _reference(transform, path)[0]
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() == 0, (path, np.abs(got - want).max())  # bit-exact


def test_preprocess_inception_folds_transform_input_into_the_normalisation(files):
    """torchvision's inception_v3 weights run with transform_input=True on ImageNet-normalised
    input, i.e. on (x - 0.5) / 0.5: what flaxbones' inception_v3 gets from `preprocess`."""
    weights = get_model_weights("inception_v3").DEFAULT
    mean, std = (np.array(v, np.float32) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    got = fb.preprocess(files, "inception_v3")
    assert got.shape == (len(files), 299, 299, 3)
    for path, x in zip(files, got):
        want = (_reference(weights.transforms(), path)[0] * std + mean - 0.5) / 0.5
        assert np.abs(x - want).max() < 1e-5


def test_eval_transforms_are_those_of_the_reference_weights():
    """Every registered name with torchvision DEFAULT weights (or timm's default tag): crop,
    resize, interpolation, normalisation; segmenters' 520 resize; detectors' labels."""
    checked = 0
    for name in fb.list_models():
        source = fb.get_spec(name).weights
        if source is None or source.transform:
            continue
        if source.name == "timm":
            cfg = timm.models.get_pretrained_cfg(TIMM_NAMES.get(name, name))
            want = dict(input_size=cfg.input_size[-1], resize_size=int(
                cfg.input_size[-1] / cfg.crop_pct), interpolation=cfg.interpolation,
                crop_mode=cfg.crop_mode, mean=cfg.mean, std=cfg.std)
        else:
            try:
                t = get_model_weights(name).DEFAULT.transforms
            except ValueError:  # mobilenet_v2_050 etc.: torchvision has no weights
                continue
            kw = t.keywords
            if t.func.__name__ == "SemanticSegmentation":
                want = dict(resize_size=kw["resize_size"])
            else:
                want = dict(input_size=kw["crop_size"], resize_size=kw.get("resize_size", 256),
                            interpolation=kw.get("interpolation", "bilinear"),
                            mean=kw.get("mean", (0.485, 0.456, 0.406)),
                            std=kw.get("std", (0.229, 0.224, 0.225)))
                if name in ("inception_v3", "googlenet"):  # transform_input folded in
                    want.update(mean=(0.5,) * 3, std=(0.5,) * 3)
            if "interpolation" in want:  # an InterpolationMode
                want["interpolation"] = getattr(want["interpolation"], "value",
                                                want["interpolation"])
        got = {k: getattr(source, k) for k in want}
        got["resize_size"] = got["resize_size"] or round(source.input_size / 0.875)
        want = {k: tuple(v) if isinstance(v, list) else v for k, v in want.items()}
        assert got == want, name
        checked += 1
    assert checked >= 100


def test_preprocess_takes_paths_pil_images_and_arrays(files):
    with Image.open(files[2]) as gray:
        gray.load()
    arrays = {"uint8 (H, W)": np.asarray(gray), "uint8 (H, W, 1)": np.asarray(gray)[..., None],
              "PIL": gray, "path": files[2], "pathlib": pathlib.Path(files[2])}
    want = fb.preprocess(files[2], "resnet18")
    for what, image in arrays.items():
        np.testing.assert_array_equal(fb.preprocess(image, "resnet18"), want, err_msg=what)
    with Image.open(files[3]) as rgba:
        rgba.load()
    np.testing.assert_array_equal(fb.preprocess(np.asarray(rgba), "resnet18"),
                                  fb.preprocess(rgba.convert("RGB"), "resnet18"))
    # floats in [0, 1]: Pillow's resize in float, so within a uint8 rounding of the uint8 path
    rgb = np.asarray(rgba.convert("RGB"))
    close = fb.preprocess(rgb / np.float32(255), "resnet18")
    assert np.abs(close - fb.preprocess(rgb, "resnet18")).max() < 1.5 / 255 / 0.224
    batch = fb.preprocess(np.stack([rgb, rgb]), "resnet18")  # a 4-D array is a batch
    assert batch.shape == (2, 224, 224, 3)
    assert fb.preprocess([rgb, files[0]], "resnet18", crop_size=32).shape == (2, 32, 32, 3)
    segments = fb.preprocess([rgb, rgb], "deeplabv3_resnet50", resize_size=40)
    assert segments.shape == (2, 40, 54, 3)  # all the same size: stacked


@pytest.mark.parametrize("images, error", [
    (np.zeros((8, 8, 2), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((8, 8, 3), np.int32), "uint8 or float"),
    (np.full((8, 8, 3), 255.0, np.float32), r"\[0, 1\]"),
    (np.zeros((0, 8, 3), np.uint8), "shape"),
    ([], "at least one image"),
])
def test_preprocess_bad_images_are_clear_errors(images, error):
    with pytest.raises(ValueError, match=error):
        fb.preprocess(images, "resnet18")


def test_preprocess_bad_models_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model name 'resnet19'.*resnet18"):
        fb.preprocess(np.zeros((8, 8, 3), np.uint8), "resnet19")
    with pytest.raises(ValueError, match="no weight source"):
        fb.preprocess(np.zeros((8, 8, 3), np.uint8), "deeplabv3plus")
    with pytest.raises(ValueError, match="task must be one of"):
        fb.preprocess(np.zeros((8, 8, 3), np.uint8), "resnet18", task="depth")
    (tmp_path / "x.jpg").write_bytes(b"no image")
    with pytest.raises(ValueError, match="cannot decode .*x.jpg"):
        fb.preprocess(str(tmp_path / "x.jpg"), "resnet18")


def test_class_names_ship_as_package_data():
    from torchvision.models import _meta
    assert fb.imagenet_classes() == list(_meta._IMAGENET_CATEGORIES)
    assert fb.class_names("resnet18") == fb.class_names("vit_base_patch16_224") == \
        fb.imagenet_classes()
    assert fb.class_names("lraspp_mobilenet_v3_large") == list(_meta._VOC_CATEGORIES)
    assert fb.class_names("maskrcnn_resnet50_fpn") == list(_meta._COCO_CATEGORIES)
    assert fb.class_names("keypointrcnn_resnet50_fpn") == list(_meta._COCO_PERSON_CATEGORIES)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["flaxbones"]
    data = [p.relative_to(ROOT / "flaxbones").as_posix()
            for p in (ROOT / "flaxbones").rglob("*") if p.is_file()
            and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data and set(data) <= set(shipped), "declare the package's data files in pyproject"


def test_predict_py_weights_prints_torchvisions_top5(files, tmp_path, caplog, capsys):
    """predict.py --weights resnet18.pth --model resnet18 on PNG/JPEG files (grayscale and
    RGBA too): the top-5 ImageNet names and probabilities torchvision gives with its own
    transforms on the same files; one compile for all sizes (batches of 4, the last padded)."""
    from absl import flags
    predict = load_module("predict")
    torch.manual_seed(0)  # BN statistics from randomize: logits spread with std ~3.5
    model = randomize(torchvision.models.resnet18(), seed=1).eval()
    weights = save_state(model, tmp_path / "resnet18.pth")
    transform = get_model_weights("resnet18").DEFAULT.transforms()
    categories = get_model_weights("resnet18").DEFAULT.meta["categories"]
    with torch.no_grad():
        probs = torch.softmax(model(torch.cat([torch.from_numpy(
            _reference(transform, p).transpose(0, 3, 1, 2)) for p in files])), -1).numpy()
    flags.FLAGS(["predict.py", f"--weights={weights}", "--model=resnet18", "--batch_size=4",
                 f"--output={tmp_path / 'out'}"])
    try:
        with traces_of("forward", caplog) as traces:
            predict.main(["predict.py", *files])
    finally:
        flags.FLAGS.unparse_flags()
    assert len(traces) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(files)
    for line, path, p in zip(lines, files, probs):
        top = np.argsort(-p)[:6]
        assert np.diff(p[top]).max() < -1e-5, "top 5 closer than fp32 noise"  # 6e-5 here
        head, printed = line.split(": ", 1)
        assert head == path
        found = [re.fullmatch(r"(.+) (\d\.\d{3})", item).groups() for item in printed.split(", ")]
        assert [n for n, _ in found] == [categories[k] for k in top[:5]], line
        assert np.abs(np.array([float(v) for _, v in found]) - p[top[:5]]).max() <= 6e-4, line

    # The same weights as a flaxbones safetensors file that names its model and its classes
    mine = fb.save_weights(fb.load_pretrained("resnet18", weights), tmp_path / "mine.safetensors",
                           model="resnet18", metadata={"class_names": json.dumps(
                               [f"thing {k}" for k in range(1000)])})
    for result, p in zip(predict.predict_weights(mine, files, tmp_path / "out"), probs):
        names, found = zip(*result.top)
        assert names == tuple(f"thing {k}" for k in np.argsort(-p)[:5])
        assert np.abs(np.array(found) - np.sort(p)[::-1][:5]).max() < 1e-4
    with pytest.raises(ValueError, match="does not name its model.*--model"):
        predict.predict_weights(weights, files, tmp_path / "out")


def test_predict_segmentation_weights_overlays_at_each_image_size(files, tmp_path, caplog):
    """A torchvision lraspp_mobilenet_v3_large file: overlay and mask PNGs at each image's own
    size, one compile per size bucket (6 images, 2 buckets); where an image's resized size is
    its bucket (no padding), or without buckets, the mask is torchvision's own prediction."""
    predict = load_module("predict")
    torch.manual_seed(0)  # torchvision's init; no class biases: the class map has regions
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for layer in (model.classifier.low_classifier, model.classifier.high_classifier):
            layer.bias.zero_()
            layer.weight.mul_(10)
    weights = save_state(model, tmp_path / "lraspp.safetensors")
    shapes = {fb.preprocess(p, "lraspp_mobilenet_v3_large", resize_size=64).shape[1:3]
              for p in files}
    buckets = {tuple(predict.segmentation_bucket(n, 64) for n in hw) for hw in shapes}
    assert len(buckets) == 2
    with traces_of("forward", caplog) as traces:
        results = predict.predict_weights(
            weights, files, tmp_path / "out", "lraspp_mobilenet_v3_large", resize_size=64,
            model_kwargs={"cpu_kernels": False})
    assert len(traces) == len(buckets)
    for result, path in zip(results, files):
        h, w = FILES[pathlib.Path(path).name][0]
        assert result.mask.shape == (h, w) and result.mask.max() < 21
        with Image.open(result.overlay) as overlay, Image.open(result.mask_file) as mask:
            assert overlay.size == mask.size == (w, h) and overlay.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(mask), result.mask)
        assert result.class_names[0] == "__background__"
    wide, logo = files[-1], files[3]  # 128 x 192 -> 64 x 96, a bucket: nothing padded
    [unpadded] = predict.predict_weights(  # 45 x 61 -> 64 x 86, padded in its bucket
        weights, [logo], tmp_path / "exact", "lraspp_mobilenet_v3_large", resize_size=64,
        model_kwargs={"cpu_kernels": False}, size_buckets=False)
    transform = get_model_weights("lraspp_mobilenet_v3_large").DEFAULT.transforms(resize_size=64)
    for path, mask in ((wide, results[-1].mask), (logo, unpadded.mask)):
        with torch.no_grad():
            want = model(torch.from_numpy(_reference(transform, path).transpose(0, 3, 1, 2)))
        want = predict.nearest(want["out"][0].argmax(0).numpy(), mask.shape)
        assert len(np.unique(want)) > 3
        assert (mask == want).mean() > 0.999, path  # 1.0 here; 0.93 for logo in its bucket
    line = predict.describe(results[-1], 0.5)
    assert line.startswith(f"{wide}: overlay written to ") and "%" in line
