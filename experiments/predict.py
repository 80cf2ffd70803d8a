"""Predict with a trained checkpoint or a weight file: top-k classes (named when the dataset
or the weights name them), segmentation overlays, or a detector's instances printed and drawn.

    python experiments/predict.py --checkpoint=workdir/demo/checkpoints --output=preds \
        image1.png image2.jpg
    python experiments/predict.py --weights=resnet50.pth --model=resnet50 cat.jpg
    python experiments/predict.py --weights=deeplabv3_resnet50.pth \
        --model=deeplabv3_resnet50 --output=preds street.jpg
    python experiments/predict.py --weights=finetuned.safetensors cat.jpg  # flaxbones layout

With `--weights`, a torchvision/timm file (.pth/.safetensors) needs `--model` (and
`--model_kwargs` for another num_classes, ...); a flaxbones-layout safetensors file carries
its model. Each image gets the evaluation transform of those weights (`fb.preprocess`): a
classifier the central crop (one compile) and prints class names (ImageNet-1k's for 1000
classes) and probabilities; a segmenter the shorter side resized (520 for torchvision's
presets), zero-padded into a size bucket (`segmentation_bucket`: one compile per bucket;
`--nosize_buckets`: unpadded, exactly torchvision's input, one compile per size), its class
map cropped back and resized (nearest) to the image's own size; a detector its weights'
resize rule and size buckets (`fb.detection.preprocess`), as below.

From a checkpoint, the model, its kwargs, the normalisation and the input size come from its
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
A segmentation writes `<image>_overlay.png` (the image with its class map blended in, at the
image's own size) and `<image>_mask.png` (the class ids as a palette PNG); a detection
`<image>_detections.png`.
"""
import dataclasses
import json
import math
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
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "A weight file instead of --checkpoint: torchvision/timm .pth/.safetensors "
    "(with --model) or a flaxbones-layout .safetensors (which names its model).")
_MODEL = flags.DEFINE_string("model", None, "The registered name a --weights file is for.")
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs", "{}", "create_model kwargs for --model, as JSON: '{\"num_classes\": 10}'.")
_RESIZE = flags.DEFINE_integer(
    "resize_size", None, "With --weights: the shorter side a segmenter's images are resized "
    "to (default: the weights', 520 for torchvision's), a classifier's before its crop, a "
    "detector's min_size.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per classifier call with --weights.")
_BUCKETS = flags.DEFINE_bool(
    "size_buckets", True, "With --weights: pad segmenter/detector inputs into size buckets (a "
    "compile per bucket); --nosize_buckets runs each image at its own resized size, unpadded "
    "as torchvision runs a segmenter (a compile per size).")
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
    mask_file: pathlib.Path | None = None
    class_names: list | None = None
    detections: list | None = None
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8 (PIL's convert("RGB"): grayscale, palette and RGBA files too); a file
    that is not a decodable image raises a ValueError naming it."""
    return fb.transforms.read_image(path)


def resize(image, hw) -> np.ndarray:
    """Bilinear resize of a uint8 image to (h, w); PIL antialiases when it shrinks."""
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def center_crop(image, size: int) -> np.ndarray:
    """torchvision's eval transform, Resize(round(size / 0.875)) then CenterCrop(size)."""
    hw = fb.transforms.shorter_side_size(image.shape[:2], round(size / CROP_FRACTION))
    return fb.transforms.center_crop(resize(image, hw), size)


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
    settings = dict(min_size=min_size, max_size=d["max_size"], mean=mean, std=std)
    return run_detector(model, variables, paths, images, output, score_thresh,
                        lambda image: fb.detection.preprocess([image], **settings),
                        detection_class_names(config))


def run_detector(model, variables, paths, images, output, score_thresh, preprocess,
                 names) -> list[Prediction]:
    """Detections scoring >= `score_thresh` of each image, and a PNG of them in `output`;
    `preprocess(image)` gives (batch, image_sizes, original_sizes) of one image."""
    def detector(variables, batch, image_sizes):
        return model.apply(variables, batch, image_sizes, train=False)
    detector = jax.jit(detector)

    pathlib.Path(output).mkdir(parents=True, exist_ok=True)
    results = []
    for path, stem, image in zip(paths, output_stems(paths), images):
        batch, sizes, original = preprocess(image)
        found = fb.detection.postprocess(detector(variables, batch, sizes), sizes, original)[0]
        keep = np.flatnonzero(found["scores"] >= score_thresh)
        keep = keep[np.argsort(-found["scores"][keep], kind="stable")]
        found = {k: v[keep] for k, v in found.items()}
        target = pathlib.Path(output) / f"{stem}_detections.png"
        pictures.save_detection_image(target, image, found, names)
        results.append(Prediction(
            path, overlay=target, masks=found.get("masks"), keypoints=found.get("keypoints"),
            detections=[(names[k] if names else int(k), float(score),
                         tuple(float(v) for v in box))
                        for k, score, box in zip(found["labels"], found["scores"],
                                                 found["boxes"])]))
    return results


def output_stems(paths) -> list[str]:
    """Each image's file name without its suffix, or with it ('a_jpg') where two share one."""
    stems = [pathlib.Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}_{pathlib.Path(p).suffix[1:]}"
            for s, p in zip(stems, paths)]


def voc_palette() -> np.ndarray:
    """(256, 3) uint8: PASCAL VOC's colour map (the bits of the class id spread over R, G, B;
    0 black, 255 'void' cream), 256 distinct colours for class-id PNGs."""
    ids = np.arange(256)
    rgb = np.zeros((256, 3), np.int64)
    for bit in range(8):
        for c in range(3):
            rgb[:, c] |= ((ids >> (3 * bit + c)) & 1) << (7 - bit)
    return rgb.astype(np.uint8)


def save_segmentation(output, path, stem, image, mask, names=None, alpha=0.5) -> Prediction:
    """`<stem>_overlay.png`, the image with its class map blended in VOC's colours (a class
    named background left clear), and `<stem>_mask.png`, the class ids as a palette PNG;
    both at the image's own size."""
    from PIL import Image
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    blend = np.ones(mask.shape, bool)
    for k, name in enumerate(names or ()):
        if name in ("__background__", "background"):
            blend &= mask != k
    overlay = image.astype(np.float32)
    overlay[blend] = (1 - alpha) * overlay[blend] + alpha * palette[mask[blend]]
    overlay_file, mask_file = output / f"{stem}_overlay.png", output / f"{stem}_mask.png"
    Image.fromarray(np.round(overlay).astype(np.uint8)).save(overlay_file)
    ids = Image.fromarray(mask.astype(np.uint8), mode="P")
    ids.putpalette(palette.ravel().tolist())
    ids.save(mask_file)
    return Prediction(str(path), mask=mask, overlay=overlay_file, mask_file=mask_file,
                      class_names=names)


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
    for path, stem, image in zip(paths, output_stems(paths), images):
        if not segmenter:
            crop = center_crop(image, pair(config["image_size"], "image_size")[0])
            probs = np.asarray(forward(variables, normalize(crop)[None]))[0]
            results.append(Prediction(path, top=top_classes(probs, names, topk)))
            continue
        size = pair(config["eval_size"], "eval_size")
        scaled, hw = fit(image, size)
        canvas = np.zeros((1, *size, 3), np.float32)  # 0 = the mean colour, as in training
        canvas[0, :hw[0], :hw[1]] = normalize(scaled)
        mask = nearest(np.asarray(forward(variables, canvas))[0, :hw[0], :hw[1]], image.shape[:2])
        results.append(save_segmentation(output, path, stem, image, mask, names))
    return results


def top_classes(probs, names, topk) -> list:
    """[(name, or index without names, probability)] of the `topk` likeliest classes."""
    best = np.argsort(-probs, kind="stable")[:topk]
    return [(names[k] if names and k < len(names) else int(k), float(probs[k])) for k in best]


def file_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file ({} for other files): `fb.save_weights` writes the
    model's name, its kwargs and normalisation there."""
    if pathlib.Path(path).suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def load_weights(path, name=None, model_kwargs=None):
    """(model, variables, name, kwargs, weight source, class names or None) of a weight file:
    a torchvision/timm file for the registered `name` (created with `model_kwargs`), or a file
    `fb.save_weights` wrote, whose metadata names the model and its kwargs (`model_kwargs`
    override them). The source is the name's with the file's own normalisation where it has
    one; the names are the file's `class_names` (a JSON list in its metadata, for a model
    fine-tuned on other classes), else the weights' own (`fb.class_names`) when the model
    has their number of classes."""
    from flaxbones.weights.io import LAYOUT, decode_kwargs
    meta = file_metadata(path)
    saved = meta.get("model") if LAYOUT in meta else None
    if name is None and saved is None:
        raise ValueError(f"{path} does not name its model (only files fb.save_weights wrote "
                         "do): give the registered name it is for (--model)")
    name = name or saved
    kwargs = {**(decode_kwargs(meta.get("model_kwargs", "{}")) if saved else {}),
              **(model_kwargs or {})}
    variables = fb.load_pretrained(name, path, **(model_kwargs or {}) if saved else kwargs)
    source = fb.get_spec(name).weights
    if source is None and "mean" not in meta:
        raise ValueError(f"{name!r} has no weight source and {path} no normalisation "
                         "metadata, so its input transform is unknown")
    if source is None or kwargs.get("num_classes", source.num_classes) != source.num_classes:
        names = None
    else:
        names = fb.class_names(source)
    if "class_names" in meta:
        names = list(json.loads(meta["class_names"]))
    source = source or fb.weights.WeightSource("file", ())
    changes = {k: tuple(json.loads(meta[k])) for k in ("mean", "std") if k in meta}
    if "input_size" in meta:
        changes["input_size"] = int(meta["input_size"])
    return (fb.create_model(name, **kwargs), variables, name, kwargs, source.replace(**changes),
            names)


def segmentation_bucket(size: int, base: int, divisible: int = 32) -> int:
    """The padded length of an image side of `size` px whose shorter side was resized to
    `base`: the first of ceil(base * 2**(k/4) / divisible) * divisible (k = 0, 1, ...) that
    holds it, so shapes grow in ~19% steps and a set of images takes few buckets. The zero
    padding (the mean colour) is context the model sees, global pooling (ASPP's, LRASPP's)
    included: predictions near it differ a little from an unpadded run."""
    k = 0
    while True:
        padded = math.ceil(base * 2 ** (k / 4) / divisible) * divisible
        if padded >= size:
            return padded
        k += 1


def predict_weights(weights, paths, output, model=None, model_kwargs=None, topk=5,
                    score_thresh=0.5, resize_size=None, batch_size=8,
                    size_buckets=True) -> list[Prediction]:
    """`predict` with a weight file (`load_weights`) and its weights' own input transform
    (`fb.preprocess`): top-k class names and probabilities, segmentation overlays at each
    image's size (one compile per `segmentation_bucket`; `size_buckets=False`: per resized
    size, unpadded), or drawn detections (`fb.detection.preprocess`'s buckets; else padded
    to a multiple of 32 as torchvision pads)."""
    model, variables, name, _, source, names = load_weights(weights, model, model_kwargs)
    family = fb.get_spec(name).family
    images = [read_image(p) for p in paths]  # decode all first: a bad file fails before any work
    if family == "detector":
        overrides = dict(mean=source.mean, std=source.std)
        overrides.update({} if resize_size is None else {"min_size": resize_size})
        overrides.update({} if size_buckets else {"size_buckets": None})
        return run_detector(
            model, variables, paths, images, output, score_thresh,
            lambda image: fb.detection.preprocess(
                fb.preprocess(image, source, task="detection")[0], name, **overrides), names)
    segmenter = family == "segmenter"
    task = "segmentation" if segmenter else "classification"
    resize = {"task": task, **({} if resize_size is None else {"resize_size": resize_size})}

    def forward(variables, images):
        out = model.apply(variables, images, train=False)["out"]
        return out.argmax(-1) if segmenter else jax.nn.softmax(out.astype(np.float32))
    forward = jax.jit(forward)

    if not segmenter:
        batch = fb.preprocess(images, source, **resize)
        size = min(batch_size, len(batch))
        probs = []
        for i in range(0, len(batch), size):  # the last batch padded: one compile
            chunk = batch[i:i + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]),
                                                     chunk.dtype)])
            probs.append(np.asarray(forward(variables, padded))[:len(chunk)])
        return [Prediction(path, top=top_classes(p, names, topk))
                for path, p in zip(paths, np.concatenate(probs))]
    base = resize_size or source.resize_size or source.input_size
    results = []
    for path, stem, image in zip(paths, output_stems(paths), images):
        x = fb.preprocess(image, source, **resize)[0]
        h, w = x.shape[:2]
        hw = tuple(segmentation_bucket(n, base) if size_buckets else n for n in (h, w))
        canvas = np.zeros((1, *hw, 3), np.float32)  # 0 = the mean colour
        canvas[0, :h, :w] = x
        mask = nearest(np.asarray(forward(variables, canvas))[0, :h, :w], image.shape[:2])
        results.append(save_segmentation(output, path, stem, image, mask, names))
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


def describe_segmentation(p: Prediction, most: int = 5) -> str:
    """'path: overlay written to png (mask png): class share%, ...', the `most` largest."""
    ids, counts = np.unique(p.mask, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shares = ", ".join(
        f"{p.class_names[k] if p.class_names and k < len(p.class_names) else f'class {k}'} "
        f"{100 * c / p.mask.size:.1f}%" for k, c in zip(ids[order][:most], counts[order]))
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return f"{p.path}: overlay written to {p.overlay} (mask {p.mask_file}): {shares}{more}"


def describe(p: Prediction, score_thresh: float) -> str:
    if p.detections is not None:
        return describe_detections(p, score_thresh)
    if p.top is not None:
        return p.path + ": " + ", ".join(
            f"{k if isinstance(k, str) else f'class {k}'} {prob:.3f}" for k, prob in p.top)
    return describe_segmentation(p)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    if (_CHECKPOINT.value is None) == (_WEIGHTS.value is None):
        raise app.UsageError("give either --checkpoint or --weights")
    logging.set_verbosity(logging.WARNING)  # Orbax narrates every file at INFO
    if _WEIGHTS.value is not None:
        try:
            model_kwargs = json.loads(_MODEL_KWARGS.value)
        except json.JSONDecodeError as e:
            raise app.UsageError(f"--model_kwargs is not JSON: {e}")
        results = predict_weights(_WEIGHTS.value, paths, _OUTPUT.value, _MODEL.value,
                                  model_kwargs, _TOPK.value, _SCORE_THRESH.value,
                                  _RESIZE.value, _BATCH.value, _BUCKETS.value)
    else:
        results = predict(_CHECKPOINT.value, paths, _OUTPUT.value, _TOPK.value,
                          _SCORE_THRESH.value)
    for p in results:
        print(describe(p, _SCORE_THRESH.value))


if __name__ == "__main__":
    app.run(main)
