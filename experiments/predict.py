"""Predict with a trained checkpoint: top-k classes (named when the dataset names them),
overlay PNGs of a segmentation, or a detector's instances printed and drawn.

    python experiments/predict.py --checkpoint=workdir/demo/checkpoints --output=preds \
        image1.png image2.jpg

The model, its kwargs, the normalisation and the input size come from the checkpoint's
metadata (train.py's config). Images of any size are brought to that one input size, so a
single compiled function serves them all:
- a classifier sees torchvision's evaluation transform: the shorter side resized to
  image_size / 0.875 with antialiasing, then the central image_size crop;
- a segmenter sees the image scaled (down or up, aspect kept) to fit the eval size and
  padded to it; its prediction is cropped back and resized (nearest) to the image's own
  size, so masks and overlays match the original image;
- a detector sees its training transform (config.detection's min_size / max_size resize,
  then zero padding into a size bucket: `fb.detection.preprocess`), so it compiles once per
  bucket, not per image; its boxes and masks are mapped back to each image's own frame.
"""
import dataclasses
import os
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "configs")]
import pictures  # noqa: E402
from common import pair  # noqa: E402

import flaxbones as fb  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train.py workdir's checkpoints/ directory.")
_OUTPUT = flags.DEFINE_string("output", "predictions", "Where overlay PNGs are written.")
_TOPK = flags.DEFINE_integer("topk", 5, "How many classes to print for a classifier.")
_SCORE_THRESH = flags.DEFINE_float("score_thresh", 0.5, "The lowest score a detection is kept at.")

CROP_FRACTION = 0.875


@dataclasses.dataclass
class Prediction:
    """A classifier's `top` [(class name, or index when the dataset has no names,
    probability)], a segmenter's `mask` (H, W) class ids at the image's size, or a
    detector's `detections` [(class name or index, score, (x0, y0, x1, y1) pixels)] best
    first, their `masks` (k, H, W) in [0, 1] (None without a mask head) and `keypoints`
    (k, K, 3) (x, y, visibility) in pixels (None without a keypoint head); `overlay` is the
    PNG that shows a segmentation or the detections."""

    path: str
    top: list | None = None
    mask: np.ndarray | None = None
    overlay: pathlib.Path | None = None
    detections: list | None = None
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8; a file that is not a decodable image raises a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode {path} as an image: {e}") from e


def resize(image, hw) -> np.ndarray:
    """Bilinear resize of a uint8 image to (h, w); PIL antialiases when it shrinks."""
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def center_crop(image, size: int) -> np.ndarray:
    """torchvision's eval transform, Resize(round(size / 0.875)) then CenterCrop(size)."""
    h, w = image.shape[:2]
    short = round(size / CROP_FRACTION)
    hw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    image = resize(image, hw)
    top, left = (int(round((n - size) / 2.0)) for n in hw)
    return image[top:top + size, left:left + size]


def fit(image, size) -> tuple[np.ndarray, tuple[int, int]]:
    """The image scaled to fit in `size` (h, w), aspect kept, and the (h, w) it got."""
    h, w = image.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    hw = (min(size[0], max(1, round(h * scale))), min(size[1], max(1, round(w * scale))))
    return resize(image, hw), hw


def nearest(mask, hw) -> np.ndarray:
    """Nearest-neighbour resize of a class map to (h, w), sampling at pixel centres."""
    rows, cols = ((np.arange(n) + 0.5) * mask.shape[i] / n for i, n in enumerate(hw))
    return mask[rows.astype(int)][:, cols.astype(int)]


def load(checkpoint):
    """(model, variables, saved config) from a checkpoint directory written by train.py."""
    from flaxbones.train.checkpoint import Checkpoints
    with Checkpoints(checkpoint) as ckpt:
        meta = ckpt.read_meta()
    if not meta.get("config"):
        raise ValueError(f"{checkpoint} has no experiment config in its metadata; "
                         "predict.py reads the checkpoints of experiments/train.py")
    variables = fb.load_pretrained(None, checkpoint)
    model = fb.create_model(meta["model"], **meta.get("model_kwargs", {}))
    return model, variables, meta["config"]


def class_names(config, num_classes: int):
    """The dataset's names of the model's classes, or None when it has none."""
    import tensorflow_datasets as tfds

    import flaxbones.data as fbd
    spec = fbd.sources.dataset_spec(config["dataset"])
    names = spec.segmentation_classes
    if config["task"] != "segmentation":
        try:  # the builder's code knows the label names even where no data is prepared
            builder = tfds.builder(config["dataset"], data_dir=config.get("data_dir") or None)
            names = getattr(builder.info.features[spec.label_key], "names", None)
        except (tfds.core.registered.DatasetNotFoundError, KeyError):
            names = None
    return list(names) if names and len(names) == num_classes else None


def detection_class_names(config):
    """'background' then the dataset's object names (the ids train.py's pipeline gives them),
    or None when they do not number the model's classes."""
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(config["dataset"], data_dir=config.get("data_dir") or None)
        names = getattr(builder.info.features["objects"]["label"], "names", None)
    except (tfds.core.registered.DatasetNotFoundError, KeyError):
        names = None
    names = ["background", *names] if names else None
    return names if names and len(names) == config["num_classes"] else None


def detect(model, variables, config, paths, images, output, score_thresh) -> list[Prediction]:
    """Each image's detections scoring >= `score_thresh`, and a PNG of them in `output`."""
    import flaxbones.data as fbd
    d = config["detection"]
    min_size = d["min_size"][-1] if isinstance(d["min_size"], list) else d["min_size"]
    mean, std = fbd.normalization(model=config["normalize_like"])
    names = detection_class_names(config)

    def detector(variables, batch, image_sizes):
        return model.apply(variables, batch, image_sizes, train=False)
    detector = jax.jit(detector)

    pathlib.Path(output).mkdir(parents=True, exist_ok=True)
    results = []
    for path, image in zip(paths, images):
        batch, sizes, original = fb.detection.preprocess(
            [image], min_size=min_size, max_size=d["max_size"], mean=mean, std=std)
        found = fb.detection.postprocess(detector(variables, batch, sizes), sizes, original)[0]
        keep = np.flatnonzero(found["scores"] >= score_thresh)
        keep = keep[np.argsort(-found["scores"][keep], kind="stable")]
        found = {k: v[keep] for k, v in found.items()}
        target = pathlib.Path(output) / (pathlib.Path(path).stem + "_detections.png")
        pictures.save_detection_image(target, image, found, names)
        results.append(Prediction(
            path, overlay=target, masks=found.get("masks"), keypoints=found.get("keypoints"),
            detections=[(names[k] if names else int(k), float(score),
                         tuple(float(v) for v in box))
                        for k, score, box in zip(found["labels"], found["scores"],
                                                 found["boxes"])]))
    return results


def predict(checkpoint, paths, output, topk=5, score_thresh=0.5) -> list[Prediction]:
    """Top-k classes (classifier), masks and overlay PNGs in `output` (segmenter), or
    detections and their PNGs in `output` (detector)."""
    import flaxbones.data as fbd
    model, variables, config = load(checkpoint)
    images = [read_image(p) for p in paths]  # decode all first: a bad file fails before any work
    if config["task"] == "detection":
        return detect(model, variables, config, paths, images, output, score_thresh)
    mean, std = (np.asarray(v, np.float32)
                 for v in fbd.normalization(model=config["normalize_like"]))
    names = class_names(config, config["num_classes"])
    segmenter = config["task"] == "segmentation"

    def forward(variables, images):
        out = model.apply(variables, images, train=False)["out"]
        return out.argmax(-1) if segmenter else jax.nn.softmax(out.astype(np.float32))
    forward = jax.jit(forward)

    def normalize(image):
        return (image / np.float32(255) - mean) / std

    results = []
    for path, image in zip(paths, images):
        if not segmenter:
            crop = center_crop(image, pair(config["image_size"], "image_size")[0])
            probs = np.asarray(forward(variables, normalize(crop)[None]))[0]
            best = np.argsort(-probs)[:topk]
            results.append(Prediction(path, top=[(names[k] if names else int(k), float(probs[k]))
                                                 for k in best]))
            continue
        size = pair(config["eval_size"], "eval_size")
        scaled, hw = fit(image, size)
        canvas = np.zeros((1, *size, 3), np.float32)  # 0 = the mean colour, as in training
        canvas[0, :hw[0], :hw[1]] = normalize(scaled)
        mask = nearest(np.asarray(forward(variables, canvas))[0, :hw[0], :hw[1]], image.shape[:2])
        pathlib.Path(output).mkdir(parents=True, exist_ok=True)
        target = pathlib.Path(output) / (pathlib.Path(path).stem + "_overlay.png")
        pictures.save_overlays(target, image[None], None, mask[None], names,
                               panel_inches=float(np.clip(image.shape[1] / 100, 3, 8)))
        results.append(Prediction(path, mask=mask, overlay=target))
    return results


def describe_detections(p: Prediction, score_thresh: float) -> str:
    """'path: k detections with score >= t, drawn in png' then one line per detection."""
    count = f"{len(p.detections)} detection{'' if len(p.detections) == 1 else 's'}"
    lines = [f"{p.path}: {count} with score >= {score_thresh:g}, drawn in {p.overlay}"]
    for i, (name, score, box) in enumerate(p.detections):
        name = name if isinstance(name, str) else f"class {name}"
        lines.append(f"  {name:<12} {score:.3f}  box ({', '.join(f'{v:.1f}' for v in box)})")
        if p.keypoints is not None:
            lines[-1] += "  keypoints " + " ".join(
                f"({x:.0f},{y:.0f})" if v > 0 else "-" for x, y, v in p.keypoints[i])
    return "\n".join(lines)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    if _CHECKPOINT.value is None:
        raise app.UsageError("--checkpoint is required")
    logging.set_verbosity(logging.WARNING)  # Orbax narrates every file at INFO
    for p in predict(_CHECKPOINT.value, paths, _OUTPUT.value, _TOPK.value,
                     _SCORE_THRESH.value):
        if p.detections is not None:
            print(describe_detections(p, _SCORE_THRESH.value))
        elif p.top is not None:
            print(p.path + ": " + ", ".join(
                f"{k if isinstance(k, str) else f'class {k}'} {prob:.3f}" for k, prob in p.top))
        else:
            print(f"{p.path}: overlay written to {p.overlay}")


if __name__ == "__main__":
    app.run(main)
