"""RetinaNet (torchvision's): an FPN with P6/P7, a classification and a box-regression tower
shared over levels, 9 anchors per location; the generic builder on any backbone and the
torchvision presets with their weight rules."""
import math
from collections.abc import Sequence
from typing import Any

from flax import linen as nn

from flaxbones.detection.anchors import AnchorGenerator
from flaxbones.detection.base import (
    check_num_classes,
    detection_backbone,
    fpn_rules,
    torchvision_detector_source,
)
from flaxbones.detection.boxes import BoxCoder
from flaxbones.detection.onestage import (
    DenseBranch,
    DenseDetector,
    flatten_level,
    group_norm,
)
from flaxbones.detection.onestage_losses import check_targets, retinanet_loss
from flaxbones.heads.fpn import FPN
from flaxbones.layers import ConvNormModule, normal_001
from flaxbones.registry import register_model
from flaxbones.segmenters import backbone_rules
from flaxbones.weights.source import WeightSource


def prior_bias(prior_probability: float):
    """The classification bias giving every class probability `prior_probability` at init."""
    return nn.initializers.constant(-math.log((1 - prior_probability) / prior_probability))


class RetinaNetHead(ConvNormModule):
    """torchvision's RetinaNetHead: `classification_head` (4 conv-ReLU, `cls_logits` with the
    prior bias) and `regression_head` (4 conv-ReLU, `bbox_reg`), N(0, 0.01) weights; `norm`
    'gn' puts GroupNorm(32) after each tower conv, which then has no bias (v2's
    Conv2dNormActivation). Returns {'cls_logits': [per level
    (N, HWA, K)], 'bbox_regression': [per level (N, HWA, 4)]}."""

    num_anchors: int
    num_classes: int
    channels: int = 256
    norm: str | None = None
    prior_probability: float = 0.01

    @nn.compact
    def __call__(self, levels):
        if self.norm not in (None, "gn"):
            raise ValueError(f"RetinaNetHead norm must be None or 'gn', got {self.norm!r}")
        conv = self.conv_def(use_bias=True, kernel_init=normal_001)
        norm = group_norm(32, self.dtype, self.param_dtype) if self.norm else None
        a, k = self.num_anchors, self.num_classes
        prior = prior_bias(self.prior_probability)
        cls = DenseBranch(self.channels, (("cls_logits", a * k, prior),),
                          conv, norm, tower_bias=norm is None, name="classification_head")
        reg = DenseBranch(self.channels, (("bbox_reg", a * 4, nn.initializers.zeros),), conv, norm,
                          tower_bias=norm is None, name="regression_head")
        return {"cls_logits": [flatten_level(cls(x)[0], k) for x in levels],
                "bbox_regression": [flatten_level(reg(x)[0], 4) for x in levels]}


def retinanet_anchor_sizes(strides=(8, 16, 32, 64, 128)) -> tuple:
    """torchvision's `_default_anchorgen` sizes: (s, int(s 2^(1/3)), int(s 2^(2/3))) with
    s = 4 x each level's stride (32 ... 512 on P3..P7)."""
    sizes = [4 * s for s in strides]
    return tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in sizes)


class RetinaNet(DenseDetector):
    """RetinaNet detector (see `DenseDetector` for the call and outputs): sigmoid class
    scores, BoxCoder((1, 1, 1, 1)) decoding; sown intermediates 'cls_logits',
    'bbox_regression'. Train mode returns torchvision's {'classification',
    'bbox_regression'}; `bbox_loss` ('l1' v1, 'giou' v2) is its regression loss."""

    bbox_loss: str = "l1"

    def level_scores(self, outputs):
        return nn.sigmoid(outputs["cls_logits"])

    def decode(self, codes, anchors):
        return BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, anchors)

    def loss(self, outputs, anchors, level_counts, targets):
        logits = outputs["cls_logits"]
        boxes, labels, valid = check_targets(targets, logits.shape[0], logits.shape[-1])
        return retinanet_loss(logits, outputs["bbox_regression"], anchors, boxes, labels, valid,
                              self.bbox_loss)


@register_model("detector")
def retinanet(backbone: Any = "resnet50", num_classes: int = 91,
              fpn_levels: Sequence[str] = ("C3", "C4", "C5"), extra: str = "p6p7",
              head_norm: str | None = None, anchor_sizes: Sequence[Sequence[int]] | None = None,
              aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), score_thresh: float = 0.05,
              nms_thresh: float = 0.5, detections_per_img: int = 300,
              topk_candidates: int = 1000, trainable_layers: int | None = None,
              fpn_channels: int = 256, frozen_bn: bool = True, bbox_loss: str = "l1",
              **backbone_kwargs) -> RetinaNet:
    """RetinaNet on any backbone (a registered name or a Module): FPN on `fpn_levels` plus
    P6/P7 (`extra` 'p6p7' from P5, 'p6p7_c5' from the last level), 3 scales x
    `aspect_ratios` anchors per level (sizes 4x the level's stride, torchvision's 32 ... 512),
    torchvision's postprocess options. The backbone's BN is torchvision's FrozenBatchNorm
    (`frozen_bn`); `trainable_layers` as torchvision's trainable_backbone_layers (None: all)."""
    check_num_classes(num_classes)
    bb, common = detection_backbone(backbone, fpn_levels, frozen_bn, **backbone_kwargs)
    neck = FPN(tuple(fpn_levels), fpn_channels, extra, **common)
    n_levels = len(neck.out_levels())
    strides = [f.stride for f in neck.feature_info(bb.feature_info)]
    sizes = tuple(map(tuple, anchor_sizes)) if anchor_sizes else retinanet_anchor_sizes(strides)
    if len(sizes) != n_levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} levels; the FPN gives {n_levels}")
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * n_levels)
    head = RetinaNetHead(anchors.num_anchors_per_location()[0], num_classes, fpn_channels,
                         head_norm, **common)
    return RetinaNet(bb, neck, head, anchors, score_thresh, nms_thresh, detections_per_img,
                     topk_candidates, trainable_layers, bbox_loss=bbox_loss)


# --- torchvision presets: state dicts `backbone.body.*`, `backbone.fpn.*`, `head.*` ---

def tower_rules(branch: str, norm: bool) -> tuple:
    """`head.{branch}.conv.*` onto `head/{branch}/conv_i` (and `norm_i`): the Conv2dNormActivation
    layout `conv.i.0` / `conv.i.1`, and the older plain Sequential `conv.{2i}` torchvision still
    loads for v1 checkpoints."""
    at, to = rf"head\.{branch}\.conv\.", f"head/{branch}/"
    rules = [(at + r"(\d)\.0", to + r"conv_\1")]
    rules += [(at + r"(\d)\.1", to + r"norm_\1")] if norm else [
        (at + str(2 * i), to + f"conv_{i}") for i in range(4)]
    return tuple(rules)


def _retinanet_source(norm: bool) -> WeightSource:
    head = (tower_rules("classification_head", norm) + tower_rules("regression_head", norm)
            + ((r"head\.classification_head\.cls_logits", "head/classification_head/cls_logits"),
               (r"head\.regression_head\.bbox_reg", "head/regression_head/bbox_reg")))
    return torchvision_detector_source(
        backbone_rules("resnet50", r"backbone\.body\.") + fpn_rules() + head)


@register_model("detector", _retinanet_source(norm=False))
def retinanet_resnet50_fpn(num_classes: int = 91, trainable_layers: int | None = 3, **kwargs):
    """torchvision's retinanet_resnet50_fpn: ResNet-50 with FrozenBatchNorm at epsilon 0 (the
    COCO weights' overwrite_eps), FPN C3..C5 + P6/P7 from P5, plain head towers."""
    kwargs = {"bn_epsilon": 0.0, **kwargs}
    return retinanet("resnet50", num_classes, trainable_layers=trainable_layers, **kwargs)


@register_model("detector", _retinanet_source(norm=True))
def retinanet_resnet50_fpn_v2(num_classes: int = 91, trainable_layers: int | None = 3, **kwargs):
    """torchvision's retinanet_resnet50_fpn_v2: ResNet-50 with plain BatchNorm (eps 1e-5, as
    torchvision builds it), P6/P7 from C5, GroupNorm head towers, GIoU box loss."""
    kwargs = {"frozen_bn": False, "extra": "p6p7_c5", "head_norm": "gn", "bbox_loss": "giou",
              **kwargs}
    return retinanet("resnet50", num_classes, trainable_layers=trainable_layers, **kwargs)


__all__ = ["RetinaNet", "RetinaNetHead", "retinanet",
           "retinanet_anchor_sizes", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"]
