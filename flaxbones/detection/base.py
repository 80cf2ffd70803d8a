"""What every detector shares: input checks, the frozen detection backbone, trainable layers."""
import re

import jax
import numpy as np
from flax import traverse_util

from flaxbones.features import check_images
from flaxbones.models import check_levels
from flaxbones.segmenters import build_backbone


def check_detector_inputs(images, image_sizes):
    """Raise a ValueError naming the problem unless `images` is a float (N, H, W, 3) batch and
    `image_sizes` an integer (N, 2) array of valid (height, width) that fit inside it (the
    values are checked when they are concrete, i.e. outside jit)."""
    check_images(images)
    shape = getattr(image_sizes, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 2:
        raise ValueError(f"image_sizes must have shape (N, 2) of (height, width); got {shape}")
    if shape[0] != images.shape[0]:
        raise ValueError(f"image_sizes has {shape[0]} rows for a batch of {images.shape[0]} "
                         "images; give one (height, width) per image")
    if not np.issubdtype(image_sizes.dtype, np.integer):
        raise ValueError(f"image_sizes must be integers, got dtype {image_sizes.dtype}")
    if not isinstance(image_sizes, jax.core.Tracer):
        sizes = np.asarray(image_sizes)
        bad = np.nonzero((sizes < 1).any(1) | (sizes[:, 0] > images.shape[1])
                         | (sizes[:, 1] > images.shape[2]))[0]
        if bad.size:
            raise ValueError(f"image_sizes {sizes[bad].tolist()} (images {bad.tolist()}) do not "
                             f"fit the padded {images.shape[1]}x{images.shape[2]} batch")


def detection_backbone(backbone, levels, frozen_bn: bool = True, **kwargs):
    """(backbone, settings its heads share) for a detector reading `levels`: built from a
    registered name at output stride 32 with torchvision's FrozenBatchNorm (`frozen_bn`),
    or a given Module; a ValueError names the levels a backbone lacks."""
    if isinstance(backbone, str):
        kwargs = {"frozen_bn": frozen_bn, **kwargs}
    bb, common = build_backbone(backbone, None, 32, **kwargs)
    check_levels(bb, levels, "this detector")
    return bb, common


def check_num_classes(num_classes):
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (background included where the "
                         f"detector has one), got {num_classes!r}")


def trainable_mask(params, frozen_patterns) -> dict:
    """A tree of bools like `params`: False for the leaves whose path ('backbone/layer1_0/
    conv1/kernel') matches any regex in `frozen_patterns`; for `optax.masked` or to zero
    gradients, as torchvision's `trainable_backbone_layers` sets requires_grad."""
    flat = traverse_util.flatten_dict(params, sep="/")
    rx = [re.compile(p) for p in frozen_patterns]
    return traverse_util.unflatten_dict(
        {k: not any(r.match(k) for r in rx) for k in flat}, sep="/")


