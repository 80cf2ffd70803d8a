"""Image files in, model inputs out: the evaluation transforms of the reference weights
(torchvision's `weights.transforms()`, timm's eval transform) in numpy and Pillow, with no
TensorFlow or torch; and the class names of those weights, shipped as data."""
import functools
import json
import os
import pathlib
from importlib import resources
from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxbones.registry import ModelSpec, get_spec
from flaxbones.weights.source import INTERPOLATIONS, WeightSource

TASKS = ("classification", "segmentation", "detection")
_TASK_OF_FAMILY = {"segmenter": "segmentation", "detector": "detection"}
_LABELS_BY_CLASSES = {1000: "imagenet1k", 91: "coco", 21: "voc"}  # a reference's default lists


def preprocess(images: Any, model: str | ModelSpec | WeightSource, *, task: str | None = None,
               crop_size: int | None = None, resize_size: int | None = None,
               interpolation: str | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray | list[np.ndarray]:
    """Images as the weights of `model` expect them: NHWC float32, resized and normalised.

    Per task (from the model's family, or `task`):

    - classification: torchvision's ImageClassification (timm's eval transform for timm
      weights): the shorter side resized to the source's `resize_size` with antialiased
      bilinear / bicubic (Pillow's, as torchvision on PIL images), the central
      `input_size` crop, then [0, 1] and (x - mean) / std. Always one
      (N, crop, crop, 3) array.
    - segmentation: SemanticSegmentation: the shorter side resized (520 for
      torchvision's presets), normalised, not cropped.
    - detection: ObjectDetection: [0, 1] floats only; the model's own resize,
      normalisation and padding are `flaxbones.detection.preprocess`.

    Grayscale and RGBA become RGB as PIL's `convert("RGB")` makes them (alpha dropped),
    as torchvision's loaders do. uint8 images follow torchvision's arithmetic exactly;
    float images are resized by Pillow per channel in 32-bit float (no rounding to
    uint8). Reading files and resizing need Pillow.

    Args:
        images: One image or a list of them, each a path, a PIL image, or an HWC / HW
            array (uint8 in [0, 255], or float in [0, 1]); a 4-D array is a batch.
        model: A registered name, its `ModelSpec`, or a `WeightSource`: whose transform
            and normalisation to apply.
        task: 'classification', 'segmentation' or 'detection'; None takes the model's.
        crop_size: Overrides the source's crop (`input_size`); alone it implies
            resize_size = crop / 0.875.
        resize_size: Overrides the size the shorter side is resized to.
        interpolation: 'bilinear' or 'bicubic', overriding the source's.
        mean: Per-channel mean on the [0, 1] scale, overriding the source's.
        std: Per-channel standard deviation on the [0, 1] scale, overriding the source's.

    Returns:
        One float32 (N, H, W, 3) array when every image ends the same size, else a list
            of (H, W, 3) float32 arrays.

    Raises:
        ValueError: An unknown `task`, `interpolation` or model name, a model without a
            weight source, no images, an image array of another shape or dtype (or floats
            outside [0, 1]), or a file that does not decode as an image.
        TypeError: `model` or an image is of an unsupported type.
        ImportError: Pillow is needed (a path, or a resize) but not installed.
    """
    source, task = _source_and_task(model, task)
    if crop_size is not None and resize_size is None:
        resize_size = round(crop_size / 0.875)
    crop = crop_size or source.input_size
    default = source.input_size if task == "segmentation" else round(crop / 0.875)
    resize = resize_size or source.resize_size or default
    interpolation = interpolation or source.interpolation
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    mean = np.asarray(source.mean if mean is None else mean, np.float32)
    std = np.asarray(source.std if std is None else std, np.float32)
    out = []
    for image in _as_list(images):
        x = _rgb(image)
        if task == "classification":
            if source.crop_mode == "squash":
                x = _resize(x, (resize, resize), interpolation)
            else:
                x = _resize(x, shorter_side_size(x.shape[:2], resize), interpolation)
            x = center_crop(x, crop)
        elif task == "segmentation":
            x = _resize(x, shorter_side_size(x.shape[:2], resize), interpolation)
        x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x
        out.append(x if task == "detection" else (x - mean) / std)
    if len({x.shape for x in out}) == 1:
        return np.stack(out)
    return out


def shorter_side_size(hw, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `size` and the longer int(size * long / short), as
    torchvision's Resize(size)."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size crop of an HWC array, zero-padded first where the image is
    smaller, as torchvision's CenterCrop (its padding splits odd amounts bottom/right)."""
    h, w = image.shape[:2]
    if size > h or size > w:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the order of the classifier outputs.

    Returns:
        torchvision's list of the names, index i naming output i.
    """
    return list(_class_lists()["imagenet1k"])


def class_names(model: str | ModelSpec | WeightSource) -> list[str] | None:
    """The class names of the weights of `model`, index i naming output i.

    The source's `labels` list, else ImageNet-1k for 1000 classes, torchvision's COCO
    list for 91 (with its '__background__' and 'N/A' slots) and VOC for 21. A source's
    `labels` may be the list itself, or the key of a list flaxbones ships.

    Args:
        model: A registered name, its `ModelSpec`, or a `WeightSource`.

    Returns:
        The names, or None when none are known (or a given list does not have
            `num_classes` entries).

    Raises:
        ValueError: An unknown model name, a model without a weight source, or `labels`
            naming a list flaxbones does not ship.
        TypeError: `model` is none of the accepted types.
    """
    source, _ = _source_and_task(model, "classification")
    key = source.labels or _LABELS_BY_CLASSES.get(source.num_classes)
    if key is None or isinstance(key, (tuple, list)):
        return None if key is None or len(key) != source.num_classes else list(key)
    names = _class_lists().get(key)
    if names is None:
        raise ValueError(f"unknown labels {key!r}; flaxbones ships {sorted(_class_lists())}")
    return list(names)


@functools.cache
def _class_lists() -> dict[str, tuple[str, ...]]:
    text = resources.files("flaxbones").joinpath("class_names.json").read_text(encoding="utf-8")
    return {k: tuple(v) for k, v in json.loads(text).items()}


def _source_and_task(model, task) -> tuple[WeightSource, str]:
    if isinstance(model, str):
        model = get_spec(model)
    if isinstance(model, ModelSpec):
        name, source = model.name, model.weights
        guess = _TASK_OF_FAMILY.get(model.family, "classification")
    elif isinstance(model, WeightSource):
        name, source = None, model
        guess = "detection" if model.transform else "classification"
    else:
        raise TypeError(f"model must be a registered name, a ModelSpec or a WeightSource, "
                        f"got {type(model).__name__}")
    if source is None:
        raise ValueError(f"{name!r} has no weight source, so no known input transform; pass "
                         "the WeightSource of the weights it was trained from (e.g. "
                         "fb.get_spec('resnet50').weights)")
    task = task or guess
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return source, task


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("preprocess needs at least one image")
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # Pillow is not a core dependency
        raise ImportError("reading and resizing images needs Pillow: pip install Pillow") from e
    return Image


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file, through PIL's convert("RGB"); a file that is not a
    decodable image raises a ValueError naming it."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise ValueError(f"cannot decode {path} as an image: {e}") from e


def _rgb(image: Any) -> np.ndarray:
    """An (H, W, 3) uint8 or float32 array of one image given as a path, PIL image or array."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(pathlib.Path(image))
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    try:
        array = np.asarray(image)
    except Exception as e:
        raise TypeError(f"an image must be a path, a PIL image or an array, got "
                        f"{type(image).__name__}") from e
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got shape {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("float images must hold values in [0, 1] (got "
                             f"[{array.min()}, {array.max()}]); pass uint8 for [0, 255]")
    else:
        raise ValueError(f"an image array must be uint8 or float, got {array.dtype}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def _resize(image: np.ndarray, hw, interpolation: str) -> np.ndarray:
    """Pillow's antialiased resize of a uint8 RGB image, or of each channel of a float one."""
    Image = _pil()
    if tuple(hw) == image.shape[:2]:
        return image
    resample = {"bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[interpolation]
    size = (int(hw[1]), int(hw[0]))
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size, resample))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]))
                                .resize(size, resample)) for c in range(3)], axis=-1)
