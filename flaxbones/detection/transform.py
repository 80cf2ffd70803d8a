"""torchvision's GeneralizedRCNNTransform on the host in numpy: normalise, resize (torch's
bilinear float32 arithmetic), zero-pad into size buckets; and the inverse mapping of detections."""
import math
from typing import Sequence

import numpy as np

from flaxbones.detection.masks import paste_masks_in_image, resize_bilinear

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resized_shape(h: int, w: int, min_size: float, max_size: float, fixed_size=None):
    """(height, width) after GeneralizedRCNNTransform.resize: scale = min(min_size / short side,
    max_size / long side) in float64, each side floor(side * scale); `fixed_size` is torchvision's
    (width, height)."""
    if fixed_size is not None:
        return int(fixed_size[1]), int(fixed_size[0])
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    return int(h * scale), int(w * scale)


def resize_image(image, min_size: float, max_size: float, fixed_size=None):
    """An HWC float image resized as GeneralizedRCNNTransform.resize (bilinear,
    align_corners=False, recompute_scale_factor=True: the kernel's scale is in / out size)."""
    image = np.asarray(image, np.float32)
    return resize_bilinear(image, *resized_shape(*image.shape[:2], min_size, max_size, fixed_size),
                           channels_last=True)


def padded_size(size: int, min_size: int, max_size: int, size_divisible: int = 32,
                size_buckets: int | None = 8) -> int:
    """The padded length of a batch axis whose longest image side is `size`: the smallest of
    ceil(min_size / d) * d and ceil(j * max_size / (size_buckets * d)) * d (j = 1..size_buckets,
    d = size_divisible) that holds it, so a batch takes at most (size_buckets + 1)**2 shapes;
    torchvision's ceil(size / d) * d when `size_buckets` is None or nothing holds it."""
    d = size_divisible
    exact = int(math.ceil(size / d) * d)
    if not size_buckets:
        return exact
    ladder = [math.ceil(min_size / d) * d]
    ladder += [math.ceil(j * max_size / (size_buckets * d)) * d for j in range(1, size_buckets + 1)]
    fits = [s for s in ladder if s >= exact]
    return int(min(fits)) if fits else exact


def preprocess(images: Sequence[np.ndarray], min_size: int = 800, max_size: int = 1333,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, size_divisible: int = 32,
               fixed_size=None, size_buckets: int | None = 8):
    """HWC images (uint8 in [0, 255] -> /255, or float in [0, 1]) -> (batch (N, Hp, Wp, 3)
    float32, image_sizes (N, 2) int32, original_sizes (N, 2) int32), as torchvision's
    GeneralizedRCNNTransform in eval (normalise, then resize, then zero-pad bottom/right).
    Hp, Wp come from `padded_size`'s buckets so a jitted detector compiles a bounded number of
    times; `size_buckets=None` pads as torchvision (to a multiple of `size_divisible`).
    `fixed_size` (torchvision's (width, height), SSD) resizes without keeping the aspect."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    if not len(images):
        raise ValueError("preprocess needs at least one image")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out, sizes, original = [], [], []
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"images must be HWC with 3 channels, got shape {img.shape}")
        x = img.astype(np.float32)
        if img.dtype == np.uint8:
            x = x / np.float32(255)
        x = resize_image((x - mean) / std, min_size, max_size, fixed_size)
        out.append(x)
        sizes.append(x.shape[:2])
        original.append(img.shape[:2])
    if fixed_size is not None:
        size_buckets = None
    hp, wp = (padded_size(max(s[a] for s in sizes), min_size, max_size, size_divisible,
                          size_buckets) for a in (0, 1))
    batch = np.zeros((len(out), hp, wp, 3), np.float32)
    for i, x in enumerate(out):
        batch[i, :x.shape[0], :x.shape[1]] = x
    return batch, np.asarray(sizes, np.int32), np.asarray(original, np.int32)


def postprocess(outputs: dict, image_sizes, original_sizes) -> list[dict]:
    """Each image's valid detections in its original frame, as torchvision's
    transform.postprocess: boxes and keypoints scaled per axis by original / resized size
    (float32), masks (k, M, M) pasted into (k, H, W) with those boxes; every other (N, K, ...)
    output (scores, labels, keypoint_scores, ...) filtered alike; `valid` (N, K) is dropped."""
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    valid = outputs.pop("valid")
    results = []
    for i, (im, orig) in enumerate(zip(np.asarray(image_sizes), np.asarray(original_sizes))):
        keep = valid[i].astype(bool)
        res = {k: v[i][keep] for k, v in outputs.items()}
        rh, rw = (np.float32(o) / np.float32(s) for o, s in zip(orig, im))
        if "boxes" in res:
            res["boxes"] = res["boxes"].astype(np.float32) * np.array([rw, rh, rw, rh], np.float32)
            if "masks" in res:
                res["masks"] = paste_masks_in_image(res["masks"], res["boxes"], orig)
        if "keypoints" in res:
            kp = res["keypoints"].astype(np.float32).copy()
            kp[..., 0] *= rw
            kp[..., 1] *= rh
            res["keypoints"] = kp
        results.append(res)
    return results
