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

from flaxbones.detection import transform as _transform
from flaxbones.registry import create_model, get_spec

_DEFAULTS = dict(min_size=800, max_size=1333, size_divisible=32)


def transform_settings(model: str | None = None, **overrides) -> dict:
    """The input transform of a registered detector (its weight source's normalisation and
    resize rule), with `overrides`; torchvision's defaults for an unregistered model."""
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


def preprocess(images: Sequence[np.ndarray], model: str | None = None, **transform_kwargs):
    """(batch (N, Hp, Wp, 3) float32, image_sizes (N, 2) int32, original_sizes (N, 2)) for
    `model.apply`: HWC images (uint8 in [0, 255] or float in [0, 1]) resized, normalised and
    zero-padded as the detector `model` (a registered name) expects."""
    return _transform.preprocess(images, **transform_settings(model, **transform_kwargs))


def postprocess(outputs: dict, image_sizes, original_sizes) -> list[dict]:
    """The valid detections of each image as numpy arrays in its original frame: `boxes`
    (k, 4), `scores` (k,), `labels` (k,), and `masks` (k, H, W) in [0, 1] / `keypoints`
    (k, 17, 3) where the model has them."""
    return _transform.postprocess(jax.device_get(outputs), np.asarray(image_sizes),
                                  np.asarray(original_sizes))


def predict(model: Any, variables: dict, images: Sequence[np.ndarray], *,
            model_kwargs: dict | None = None, **transform_kwargs) -> list[dict]:
    """Detections for a list of images of any sizes, like torchvision's eval-mode output.

    `model` is a registered detector name (built with `model_kwargs`, e.g. the
    `num_classes` its variables have) or a detector Module; `transform_kwargs` override
    the name's transform (`min_size`, `max_size`, ...). The model runs under jit, once
    per padded size bucket.
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
