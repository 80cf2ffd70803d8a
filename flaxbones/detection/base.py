"""What every detector shares: input checks, the frozen detection backbone, trainable layers."""
import re
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxbones.features import check_images
from flaxbones.heads.fpn import TORCHVISION_FPN_RULES
from flaxbones.models import check_levels
from flaxbones.segmenters import build_backbone
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource


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




TRAINING_ISSUE = ("training detectors (targets, matching, losses) lands with issue 15; "
                  "call with train=False")


def default_image_sizes(images, image_sizes):
    """`image_sizes`, or every image's full padded (H, W) when None (what `init` passes)."""
    if image_sizes is None:
        return jnp.tile(jnp.asarray(images.shape[1:3], jnp.int32), (images.shape[0], 1))
    return image_sizes


# --- trainable_layers: torchvision's trainable_backbone_layers as frozen-parameter regexes ---

def resnet_frozen_patterns(trainable_layers: int | None, prefix: str = "backbone/") -> tuple:
    """`_resnet_fpn_extractor`: train the last `trainable_layers` of (layer4, layer3, layer2,
    layer1, conv1), bn1 with all 5; freeze the rest (scanned `layerI_scan` included)."""
    if trainable_layers is None:
        return ()
    _check_range(trainable_layers, 5)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    train += ["bn1"] if trainable_layers == 5 else []
    frozen = [n for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4") if n not in train]
    return tuple(f"{prefix}{n}/" if n in ("conv1", "bn1") else f"{prefix}{n}_" for n in frozen)


def sequence_frozen_patterns(trainable_layers: int | None, stage_starts: Sequence[int],
                             units: Sequence[str], prefix: str = "backbone/") -> tuple:
    """torchvision's `_mobilenet_extractor` / `_vgg_extractor` rule over a flat unit sequence:
    stages start at `stage_starts`; all units before the first trainable stage are frozen
    (every unit with 0)."""
    if trainable_layers is None:
        return ()
    stages = len(stage_starts)
    _check_range(trainable_layers, stages)
    before = len(units) if trainable_layers == 0 else stage_starts[stages - trainable_layers]
    return tuple(f"{prefix}{u}/" for u in units[:before])


def unit_stage_starts(unit_strides: Sequence[int]) -> list[int]:
    """`_mobilenet_extractor`'s stages over `features`: the stem, every strided unit, the last."""
    last = len(unit_strides) - 1
    return [0, *(i for i in range(1, last) if unit_strides[i] > 1), last]


def _check_range(value, top):
    if not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"trainable_layers must be an int in [0, {top}] (or None: all "
                         f"trainable), got {value!r}")


def backbone_frozen_patterns(backbone, trainable_layers: int | None) -> tuple:
    """Frozen-parameter regexes for a detector's `backbone` (ResNet family, MobileNet V2/V3,
    VGG as torchvision counts their stages); None trains everything; other families only
    accept None."""
    from flaxbones.backbones.mobilenet_v2 import MobileNetV2
    from flaxbones.backbones.mobilenet_v3 import MobileNetV3
    from flaxbones.backbones.resnet import ResNet
    from flaxbones.backbones.vgg import VGG

    if trainable_layers is None:
        return ()
    if isinstance(backbone, ResNet):
        return resnet_frozen_patterns(trainable_layers)
    if isinstance(backbone, (MobileNetV2, MobileNetV3)):
        strides = ((2, *(b[-1] for b in backbone.blocks), 1) if isinstance(backbone, MobileNetV3)
                   else tuple(unit[0] for unit in backbone._units))
        return sequence_frozen_patterns(trainable_layers, unit_stage_starts(strides),
                                        [f"features_{i}" for i in range(len(strides))])
    if isinstance(backbone, VGG):
        units = [f"conv{s + 1}_{j + 1}" for s, w in enumerate(backbone.stages)
                 for j in range(len(w))]
        starts = [sum(len(w) for w in backbone.stages[:s]) for s in range(len(backbone.stages))]
        return sequence_frozen_patterns(trainable_layers, starts, units)
    raise ValueError(f"trainable_layers follows torchvision's ResNet, MobileNet and VGG detection "
                     f"backbones; {type(backbone).__name__} has no such stages. Leave it None "
                     "(all trainable) and freeze with your own patterns")


def frozen_bn_patterns(backbone) -> tuple[str, ...]:
    """The scale/bias of every BatchNorm of a `frozen_bn` backbone (buffers in torchvision's
    FrozenBatchNorm2d), found on the backbone's variable shapes."""
    if not getattr(backbone, "frozen_bn", False):
        return ()
    init = partial(backbone.clone(parent=None).init, train=False)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    stats = traverse_util.flatten_dict(shapes.get("batch_stats", {}), sep="/")
    modules = sorted({key.rsplit("/", 1)[0] for key in stats})
    if not modules:
        return ()
    return (rf"^backbone/({'|'.join(map(re.escape, modules))})/(scale|bias)$",)


# --- torchvision's COCO detection weight files ---

DETECTION_TRANSFORM = (("min_size", 800), ("max_size", 1333), ("size_divisible", 32))


def fpn_rules(prefix: str = r"backbone\.fpn\.") -> tuple:
    """torchvision's detection FPN keys (`backbone.fpn.*`) onto the detector's `neck`."""
    return tuple((prefix + p, "neck/" + t) for p, t in TORCHVISION_FPN_RULES)


def torchvision_detector_source(rules, num_classes: int = 91, transform=DETECTION_TRANSFORM,
                                head_prefix=("head/",), **normalisation) -> WeightSource:
    """A torchvision COCO detector's weights (91 classes incl. background): its key `rules`,
    the class-specific layers `skip_head` may leave (`head_prefix`), its input transform;
    `input_size` is the transform's min_size, or its fixed size."""
    settings = dict(transform)
    size = settings["fixed_size"][0] if "fixed_size" in settings else settings["min_size"]
    return WeightSource("torchvision", tuple(rules), num_classes=num_classes,
                        head_prefix=head_prefix, input_size=size, transform=tuple(transform),
                        **(normalisation or TORCH_IMAGENET))
