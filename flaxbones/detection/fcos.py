"""FCOS (torchvision's): anchor-free, one point per location (an anchor of the level's
stride), GroupNorm towers, a centerness branch; the generic builder and the torchvision
preset with its weight rules."""
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.detection.anchors import AnchorGenerator
from flaxbones.detection.base import (
    check_num_classes,
    detection_backbone,
    fpn_rules,
    torchvision_detector_source,
)
from flaxbones.detection.onestage import (
    DenseBranch,
    DenseDetector,
    flatten_level,
    group_norm,
)
from flaxbones.detection.onestage_losses import check_targets, fcos_loss
from flaxbones.detection.retinanet import prior_bias
from flaxbones.heads.fpn import FPN
from flaxbones.layers import ConvNormModule, normal_001
from flaxbones.registry import register_model
from flaxbones.segmenters import backbone_rules


def linear_decode(codes, anchors, normalize_by_size: bool = True):
    """torchvision's BoxLinearCoder.decode: (left, top, right, bottom) distances from the
    anchor centre, scaled by the anchor's width/height when `normalize_by_size`."""
    anchors = anchors.astype(codes.dtype)
    cx = 0.5 * (anchors[..., 0] + anchors[..., 2])
    cy = 0.5 * (anchors[..., 1] + anchors[..., 3])
    if normalize_by_size:
        w = anchors[..., 2] - anchors[..., 0]
        h = anchors[..., 3] - anchors[..., 1]
        codes = codes * jnp.stack((w, h, w, h), axis=-1)
    return jnp.stack((cx - codes[..., 0], cy - codes[..., 1],
                      cx + codes[..., 2], cy + codes[..., 3]), axis=-1)


class FCOSHead(ConvNormModule):
    """torchvision's FCOSHead: `classification_head` (4 conv-GN(32)-ReLU, `cls_logits` with the
    prior bias) and `regression_head` (4 conv-GN-ReLU, ReLU(`bbox_reg`), `bbox_ctrness`).
    Returns per level lists of 'cls_logits' (N, HW, K), 'bbox_regression' (N, HW, 4),
    'bbox_ctrness' (N, HW, 1)."""

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    prior_probability: float = 0.01

    @nn.compact
    def __call__(self, levels):
        conv = self.conv_def(use_bias=True, kernel_init=normal_001)
        norm = group_norm(32, self.dtype, self.param_dtype)
        zeros = nn.initializers.zeros
        cls = DenseBranch(self.channels, (("cls_logits", self.num_classes,
                                           prior_bias(self.prior_probability)),),
                          conv, norm, self.num_convs, name="classification_head")
        reg = DenseBranch(self.channels, (("bbox_reg", 4, zeros), ("bbox_ctrness", 1, zeros)),
                          conv, norm, self.num_convs, name="regression_head")
        out = {"cls_logits": [], "bbox_regression": [], "bbox_ctrness": []}
        for x in levels:
            box, ctr = reg(x)
            out["cls_logits"].append(flatten_level(cls(x)[0], self.num_classes))
            out["bbox_regression"].append(flatten_level(nn.relu(box), 4))
            out["bbox_ctrness"].append(flatten_level(ctr, 1))
        return out


class FCOS(DenseDetector):
    """FCOS detector (see `DenseDetector` for the call and outputs): score
    sqrt(sigmoid(cls) * sigmoid(centerness)), BoxLinearCoder(normalize_by_size=True) decoding
    from the level anchors' centres; sown intermediates 'cls_logits', 'bbox_regression',
    'bbox_ctrness'. Train mode returns torchvision's {'classification', 'bbox_regression',
    'bbox_ctrness'} with its center sampling (`center_sampling_radius`) and scale ranges."""

    center_sampling_radius: float = 1.5

    def level_scores(self, outputs):
        return jnp.sqrt(nn.sigmoid(outputs["cls_logits"]) * nn.sigmoid(outputs["bbox_ctrness"]))

    def decode(self, codes, anchors):
        return linear_decode(codes, anchors)

    def loss(self, outputs, anchors, level_counts, targets):
        logits = outputs["cls_logits"]
        boxes, labels, valid = check_targets(targets, logits.shape[0], logits.shape[-1])
        return fcos_loss(logits, outputs["bbox_regression"], outputs["bbox_ctrness"], anchors,
                         boxes, labels, valid, level_counts, self.center_sampling_radius,
                         self.decode)


@register_model("detector")
def fcos(backbone: Any = "resnet50", num_classes: int = 91,
         fpn_levels: Sequence[str] = ("C3", "C4", "C5"), extra: str = "p6p7",
         anchor_sizes: Sequence[int] | None = None, score_thresh: float = 0.2,
         nms_thresh: float = 0.6, detections_per_img: int = 100, topk_candidates: int = 1000,
         center_sampling_radius: float = 1.5, trainable_layers: int | None = None,
         fpn_channels: int = 256, frozen_bn: bool = True, **backbone_kwargs) -> FCOS:
    """FCOS on any backbone (a registered name or a Module): FPN on `fpn_levels` plus P6/P7,
    one anchor per location of size `anchor_sizes` (default: each level's stride, 8 ... 128
    for C3..C5), torchvision's postprocess options; frozen BN and `trainable_layers` as
    `retinanet`."""
    check_num_classes(num_classes)
    bb, common = detection_backbone(backbone, fpn_levels, frozen_bn, **backbone_kwargs)
    neck = FPN(tuple(fpn_levels), fpn_channels, extra, **common)
    n_levels = len(neck.out_levels())
    strides = [f.stride for f in neck.feature_info(bb.feature_info)]
    sizes = tuple(anchor_sizes or strides)
    if len(sizes) != n_levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} levels; the FPN gives {n_levels}")
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * n_levels)
    head = FCOSHead(num_classes, fpn_channels, **common)
    return FCOS(bb, neck, head, anchors, score_thresh, nms_thresh, detections_per_img,
                topk_candidates, trainable_layers, center_sampling_radius=center_sampling_radius)


def _tower(branch: str) -> tuple:
    """`head.{branch}.conv.{3i}` conv and `.{3i + 1}` GroupNorm onto `conv_i`, `norm_i`."""
    at, to = rf"head\.{branch}\.conv\.", f"head/{branch}/"
    return tuple(r for i in range(4) for r in ((at + str(3 * i), to + f"conv_{i}"),
                                               (at + str(3 * i + 1), to + f"norm_{i}")))


_FCOS_HEAD = _tower("classification_head") + _tower("regression_head") + tuple(
    (rf"head\.{b}\.{m}", f"head/{b}/{m}") for b, m in (
        ("classification_head", "cls_logits"), ("regression_head", "bbox_reg"),
        ("regression_head", "bbox_ctrness")))


@register_model("detector", torchvision_detector_source(
    backbone_rules("resnet50", r"backbone\.body\.") + fpn_rules() + _FCOS_HEAD))
def fcos_resnet50_fpn(num_classes: int = 91, trainable_layers: int | None = 3, **kwargs):
    """torchvision's fcos_resnet50_fpn: ResNet-50 with FrozenBatchNorm (epsilon 1e-5: unlike
    RetinaNet v1 its COCO weights are not loaded with overwrite_eps), FPN C3..C5 + P6/P7
    from P5."""
    return fcos("resnet50", num_classes, trainable_layers=trainable_layers, **kwargs)


__all__ = ["FCOS", "FCOSHead", "fcos", "fcos_resnet50_fpn", "linear_decode"]
