"""Detection for users: images of any size in, detections in each image's own frame out.

`predict` = `preprocess` (host: resize by the model's rule, normalise, pad to a size bucket)
-> the jitted model -> `postprocess` (host: back to each original image, masks pasted).
The resize runs on the host in numpy: it must equal torchvision's float arithmetic per
image size, and the padded buckets then give the jitted model a bounded set of shapes.
"""
import functools
import inspect
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.typing import ArrayLike

from flaxbones.detection import transform as _transform
from flaxbones.registry import create_model, get_spec

_DEFAULTS = dict(min_size=800, max_size=1333, size_divisible=32)


def transform_settings(model: str | None = None, **overrides: Any) -> dict:
    """The input transform of a registered detector, with `overrides`.

    Its weight source's normalisation and resize rule; torchvision's defaults
    (min_size 800, max_size 1333, size_divisible 32, ImageNet mean / std) for an
    unregistered model or None.

    Args:
        model: A registered detector name, or None.
        **overrides: Options of the transform: `min_size`, `max_size`, `mean`, `std`,
            `size_divisible`, `fixed_size`, `size_buckets`.

    Returns:
        The settings dict, the keyword arguments of `preprocess`.

    Raises:
        ValueError: An override that is not a transform option, or an unknown model
            name.
    """
    settings = dict(_DEFAULTS)
    if model is not None:
        source = get_spec(model).weights
        if source is not None:
            settings.update(mean=source.mean, std=source.std, **dict(source.transform))
    settings.setdefault("mean", (0.485, 0.456, 0.406))
    settings.setdefault("std", (0.229, 0.224, 0.225))
    options = set(inspect.signature(_transform.preprocess).parameters) - {"images"}
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise ValueError(f"unknown transform options {unknown}; choose from {sorted(options)}")
    settings.update(overrides)
    return settings


def preprocess(images: Sequence[np.ndarray], model: str | None = None,
               **transform_kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of any sizes -> the padded batch a detector's `apply` takes.

    As torchvision's GeneralizedRCNNTransform in eval: normalise, resize by the model's
    rule, zero-pad bottom / right to a size bucket (so a jitted detector compiles a
    bounded number of times).

    Args:
        images: HWC images, each uint8 in [0, 255] or float in [0, 1] (one (H, W, 3)
            array is one image).
        model: The registered detector whose transform to use; None: torchvision's
            defaults.
        **transform_kwargs: Overrides of the transform (`transform_settings`).

    Returns:
        (batch float32 (N, Hp, Wp, 3), image_sizes int32 (N, 2) (h, w) after resize,
            original_sizes int32 (N, 2)).

    Raises:
        ValueError: No images, an image that is not HWC with 3 channels, or an unknown
            transform option.
    """
    return _transform.preprocess(images, **transform_settings(model, **transform_kwargs))


def postprocess(outputs: dict, image_sizes: ArrayLike, original_sizes: ArrayLike) -> list[dict]:
    """The valid detections of each image as numpy arrays in its original frame.

    As torchvision's transform.postprocess: boxes and keypoints scaled per axis by
    original / resized size, masks pasted into the image with those boxes, every other
    (N, K, ...) output filtered alike.

    Args:
        outputs: A detector's eval outputs: (N, K, ...) arrays and `valid` (N, K).
        image_sizes: (N, 2) (h, w) after resize, as `preprocess` gives.
        original_sizes: (N, 2) (h, w) of the original images.

    Returns:
        One dict per image: `boxes` float32 (k, 4) xyxy, `scores` (k,), `labels` (k,),
            and `masks` (k, H, W) in [0, 1] / `keypoints` (k, 17, 3) where the model has
            them.
    """
    return _transform.postprocess(jax.device_get(outputs), np.asarray(image_sizes),
                                  np.asarray(original_sizes))


def predict(model: Any, variables: dict, images: Sequence[np.ndarray], *,
            model_kwargs: dict | None = None, **transform_kwargs: Any) -> list[dict]:
    """Detections for a list of images of any sizes, like torchvision's eval-mode output.

    `preprocess`, then the model under jit (compiled once per padded size bucket and
    model), then `postprocess`.

    Args:
        model: A registered detector name (built with `model_kwargs`) or a detector
            Module.
        variables: The model's variables (e.g. `fb.load_pretrained`).
        images: HWC images, uint8 in [0, 255] or float in [0, 1].
        model_kwargs: `create_model` options for a name, e.g. the `num_classes` its
            variables have.
        **transform_kwargs: Overrides of the name's transform (`min_size`,
            `max_size`, ...).

    Returns:
        One dict per image, as `postprocess` returns.

    Raises:
        ValueError: `model_kwargs` with a Module, or a `preprocess` error.
        TypeError: `model` is neither a name nor a Flax Module.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    name = model if isinstance(model, str) else None
    if name is not None:
        model = create_model(name, **(model_kwargs or {}))
    elif model_kwargs:
        raise ValueError("model_kwargs apply only to a model given by name")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a registered detector name or a flax Module, got {model!r}")
    batch, sizes, original = preprocess(images, name, **transform_kwargs)
    outputs = _apply(model)(variables, batch, sizes)
    return postprocess(outputs, sizes, original)


@functools.lru_cache(maxsize=16)
def _apply(model: nn.Module):
    return jax.jit(functools.partial(model.apply, train=False))
