"""Faster / Mask / Keypoint R-CNN on any backbone: the RCNN module and the generic builders
`fasterrcnn`, `maskrcnn`, `keypointrcnn` (torchvision's architecture and test-mode settings;
its named presets and weight rules are in `rcnn_presets`)."""
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from flaxbones.detection.anchors import AnchorGenerator
from flaxbones.detection.base import (backbone_frozen_patterns,
                                      check_detector_inputs, check_num_classes,
                                      default_image_sizes, detection_backbone,
                                      frozen_bn_patterns)
from flaxbones.detection.rcnn_heads import (ConvFCHead, ConvHead, FastRCNNPredictor,
                                            KeypointRCNNPredictor, MaskRCNNPredictor, TwoMLPHead)
from flaxbones.detection.roi_heads import RoIHeads
from flaxbones.detection.rpn import RPN
from flaxbones.heads.fpn import FPN
from flaxbones.models import check_levels
from flaxbones.registry import register_model


def _shape_error(name, got, want):
    return ValueError(f"targets['{name}'] must have shape {want}, got {got}")


def check_targets(targets, images, masks: bool = False, num_keypoints: int | None = None):
    """Raise a ValueError naming the problem unless `targets` is the batched dict train mode
    needs: boxes (N, G, 4), integer labels (N, G), instance_valid (N, G), and masks
    (N, G, H, W) / keypoints (N, G, K, 3) when the detector has those branches; valid boxes
    must have positive width and height (checked when concrete, as torchvision does)."""
    if not isinstance(targets, dict):
        raise ValueError(f"train=True needs targets, a dict of batched arrays; got "  # noqa: TRY004
                         f"{type(targets).__name__}")
    needed = ["boxes", "labels", "instance_valid"] + ["masks"] * masks
    needed += ["keypoints"] * bool(num_keypoints)
    missing = [k for k in needed if k not in targets]
    if missing:
        raise ValueError(f"targets lack {missing} (this detector needs {needed})")
    n, (h, w) = images.shape[0], images.shape[1:3]
    shape = lambda k: tuple(getattr(targets[k], "shape", ()))
    boxes = shape("boxes")
    if len(boxes) != 3 or boxes[0] != n or boxes[2] != 4:
        raise _shape_error("boxes", boxes, f"({n}, G, 4)")
    g = boxes[1]
    want = {"labels": (n, g), "instance_valid": (n, g), "masks": (n, g, h, w),
            "keypoints": (n, g, num_keypoints, 3)}
    for key in needed[1:]:
        if shape(key) != want[key]:
            raise _shape_error(key, shape(key), want[key])
    if not np.issubdtype(targets["labels"].dtype, np.integer):
        raise ValueError(f"targets['labels'] must be integers, got {targets['labels'].dtype}")
    if not any(isinstance(targets[k], jax.core.Tracer) for k in ("boxes", "instance_valid")):
        b, valid = np.asarray(targets["boxes"]), np.asarray(targets["instance_valid"], bool)
        bad = valid & ((b[..., 2] <= b[..., 0]) | (b[..., 3] <= b[..., 1]))
        if bad.any():
            raise ValueError(f"valid target boxes need positive width and height; got "
                             f"{b[bad].tolist()} (image, instance {np.argwhere(bad).tolist()})")


class RCNN(nn.Module):
    """Two-stage detector: `backbone` -> `neck` (FPN with a pooled extra level) -> `rpn`
    proposals -> `roi_heads` detections (+ masks / keypoints when it has those heads).

    `apply(variables, images (N, H, W, 3), image_sizes (N, 2) int (h, w) = whole images,
    train=False)` returns fixed-size arrays: `boxes` (N, K, 4) xyxy in the padded frame,
    `scores`, `labels` (int32), `valid` (N, K), valid first by descending score, invalid slots
    all zero; Mask R-CNN adds `masks` (N, K, 28, 28) probabilities of the detected class,
    Keypoint R-CNN `keypoints` (N, K, 17, 3) and `keypoint_scores` (N, K, 17).
    Intermediates (`mutable=['intermediates']`): backbone and FPN features, the RPN's
    objectness/deltas, `proposals` + `proposal_valid` + `proposal_scores`, class logits and
    box regression, mask / keypoint logits.

    `trainable_layers` is torchvision's `trainable_backbone_layers` (None: all trainable),
    realised by `frozen_param_patterns()` for `detection.base.trainable_mask`.

    `train=True` with `targets` (see `check_targets`; padded-frame pixels) returns
    torchvision's loss dict instead: loss_objectness, loss_rpn_box_reg, loss_classifier,
    loss_box_reg (+ loss_mask, loss_keypoint); it draws from the rng 'sampling' and, with
    ordinary BatchNorm, updates `batch_stats`.
    """

    backbone: nn.Module
    neck: FPN
    rpn: RPN
    roi_heads: RoIHeads
    trainable_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_levels(self.backbone, self.neck.in_levels, "the FPN")
        backbone_frozen_patterns(self.backbone, self.trainable_layers)  # checks the value

    @property
    def feature_info(self):
        """The FPN levels (names, strides, channels), known before init."""
        return self.neck.feature_info(self.backbone.feature_info)

    def __call__(self, images, image_sizes=None, train: bool = False, targets=None):
        image_sizes = default_image_sizes(images, image_sizes)
        check_detector_inputs(images, image_sizes)
        if train:
            heads = self.roi_heads
            check_targets(targets, images, heads.mask_head is not None,
                          heads.keypoint_predictor.num_keypoints
                          if heads.keypoint_head is not None else None)
        features = self.backbone(images, train=train)
        self.sow("intermediates", "backbone_features", features)
        pyramid = self.neck(features, train=train)
        self.sow("intermediates", "features", pyramid)
        levels = list(pyramid.values())
        gt = (targets["boxes"], targets["instance_valid"]) if train else (None, None)
        proposals, valid, scores, *rpn_losses = self.rpn(levels, images.shape[1:3],
                                                         image_sizes, train, *gt)
        self.sow("intermediates", "proposals", proposals)
        self.sow("intermediates", "proposal_valid", valid)
        self.sow("intermediates", "proposal_scores", scores)
        n = len(self.neck.in_levels)  # RoIAlign reads the FPN levels, not the pooled extra
        strides = [f.stride for f in self.feature_info][:n]
        out = self.roi_heads(levels[:n], strides, proposals, valid, image_sizes,
                             images.shape[1:3], train, targets)
        return {**rpn_losses[0], **out} if train else out

    def frozen_param_patterns(self) -> tuple[str, ...]:
        """Regexes over param paths ('backbone/layer1_0/conv1/kernel') that torchvision
        would not train: the backbone layers `trainable_layers` leaves frozen, and, with
        frozen BatchNorm, every backbone BN scale/bias (buffers in FrozenBatchNorm2d)."""
        return (backbone_frozen_patterns(self.backbone, self.trainable_layers)
                + frozen_bn_patterns(self.backbone))


def default_anchors(num_levels: int, sizes=None, aspect_ratios=None) -> AnchorGenerator:
    """torchvision's default: one size per level, 32 doubling per level, ratios 0.5/1/2."""
    sizes = tuple(sizes) if sizes else tuple((32 * 2 ** i,) for i in range(num_levels))
    ratios = tuple(aspect_ratios) if aspect_ratios else ((0.5, 1.0, 2.0),) * len(sizes)
    if len(sizes) != num_levels or len(ratios) != num_levels:
        raise ValueError(f"anchor sizes {sizes} / aspect ratios {ratios} need one entry per "
                         f"RPN level ({num_levels}: the FPN levels and the pooled extra)")
    return AnchorGenerator(tuple(map(tuple, sizes)), tuple(map(tuple, ratios)))


def build_rcnn(backbone: Any = "resnet50", num_classes: int = 91, *,
               fpn_levels: Sequence[str] = ("C2", "C3", "C4", "C5"), fpn_channels: int = 256,
               fpn_norm: bool = False, fpn_names: Sequence[str] | None = None,
               trainable_layers: int | None = None, frozen_bn: bool = True,
               anchor_sizes=None, aspect_ratios=None, rpn_conv_depth: int = 1,
               rpn_pre_nms_top_n: int = 1000, rpn_post_nms_top_n: int = 1000,
               rpn_nms_thresh: float = 0.7, rpn_score_thresh: float = 0.0,
               rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 2000,
               rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
               rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
               box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
               box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
               box_head: str = "mlp", representation_size: int = 1024,
               box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
               detections_per_img: int = 100, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
               mask: str | None = None, num_keypoints: int | None = None,
               mask_channels: int = 256, mask_dim_reduced: int = 256,
               keypoint_channels: int = 512, roi_align: str = "gather",
               positive_rois_per_image: int | None = None, **backbone_kwargs) -> RCNN:
    """An RCNN from parts. `box_head` 'mlp' (v1 TwoMLPHead) or 'conv' (v2: 4 conv-BN, 1 fc);
    `mask` None, 'plain' (v1 MaskRCNNHeads) or 'bn' (v2); `num_keypoints` adds the keypoint
    branch; `mask_channels` / `keypoint_channels` are their conv widths (torchvision's 256 /
    512), `mask_dim_reduced` the mask predictor's upsampling width (256). `roi_align` is the
    RoIAlign method, 'gather' or 'matmul' (faster on CPU for small images; see
    `detection.roi_align`). `positive_rois_per_image` caps the positive RoIs the mask and
    keypoint heads train on (a random subset; None: all, as torchvision). The heads share
    the backbone's dtypes and kernel choice; their BatchNorms (v2) are ordinary, as
    torchvision's. The `*_train`, `*_iou_thresh`, `*_batch_size_per_image` and
    `*_positive_fraction` keywords are torchvision's training settings."""
    check_num_classes(num_classes)
    fpn_levels = tuple(fpn_levels)
    if box_head not in ("mlp", "conv"):
        raise ValueError(f"box_head must be 'mlp' (v1) or 'conv' (v2), got {box_head!r}")
    if mask not in (None, "plain", "bn"):
        raise ValueError(f"mask must be None, 'plain' (v1) or 'bn' (v2), got {mask!r}")
    if positive_rois_per_image is not None and positive_rois_per_image < 1:
        raise ValueError(f"positive_rois_per_image must be None or >= 1, got "
                         f"{positive_rois_per_image}")
    bb, common = detection_backbone(backbone, fpn_levels, frozen_bn, **backbone_kwargs)
    if fpn_names is None and not all(re.fullmatch(r"C\d+", n) for n in fpn_levels):
        fpn_names = tuple(map(str, range(len(fpn_levels)))) + ("pool",)  # torchvision's keys
    neck = FPN(fpn_levels, fpn_channels, extra="pool", norm=fpn_norm, names=fpn_names, **common)
    rpn = RPN(default_anchors(len(fpn_levels) + 1, anchor_sizes, aspect_ratios), rpn_conv_depth,
              rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_thresh, rpn_score_thresh,
              pre_nms_top_n_train=rpn_pre_nms_top_n_train,
              post_nms_top_n_train=rpn_post_nms_top_n_train, fg_iou_thresh=rpn_fg_iou_thresh,
              bg_iou_thresh=rpn_bg_iou_thresh, batch_size_per_image=rpn_batch_size_per_image,
              positive_fraction=rpn_positive_fraction, **common)
    head = (TwoMLPHead(representation_size, **common) if box_head == "mlp" else
            ConvFCHead((fpn_channels,) * 4, (representation_size,), **common))
    heads = dict(box_head=head, box_predictor=FastRCNNPredictor(num_classes, **common))
    if mask:
        heads.update(mask_head=ConvHead((mask_channels,) * 4, norm=mask == "bn", **common),
                     mask_predictor=MaskRCNNPredictor(num_classes, mask_dim_reduced,
                                                        **common))
    if num_keypoints:
        heads.update(keypoint_head=ConvHead((keypoint_channels,) * 8, **common),
                     keypoint_predictor=KeypointRCNNPredictor(num_keypoints, **common))
    roi_heads = RoIHeads(**heads, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
                         detections_per_img=detections_per_img,
                         bbox_reg_weights=tuple(bbox_reg_weights),
                         fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
                         batch_size_per_image=box_batch_size_per_image,
                         positive_fraction=box_positive_fraction, roi_align=roi_align,
                         positive_rois_per_image=positive_rois_per_image)
    return RCNN(bb, neck, rpn, roi_heads, trainable_layers)


@register_model("detector")
def fasterrcnn(backbone: Any = "resnet50", num_classes: int = 91, **kwargs) -> RCNN:
    """Faster R-CNN with an FPN on `fpn_levels` (C2..C5) of any backbone (frozen BN by
    default); torchvision's options (`rpn_*`, `box_*`, `detections_per_img`, anchors,
    `trainable_layers`, v2 parts `fpn_norm`, `rpn_conv_depth=2`, `box_head='conv'`) as
    keywords; the rest configure a backbone given by name."""
    return build_rcnn(backbone, num_classes, **kwargs)


@register_model("detector")
def maskrcnn(backbone: Any = "resnet50", num_classes: int = 91, mask: str = "plain",
             **kwargs) -> RCNN:
    """Mask R-CNN: Faster R-CNN plus the 14x14 RoIAlign mask branch (`mask='bn'`: v2)."""
    return build_rcnn(backbone, num_classes, mask=mask, **kwargs)


@register_model("detector")
def keypointrcnn(backbone: Any = "resnet50", num_classes: int = 2, num_keypoints: int = 17,
                 **kwargs) -> RCNN:
    """Keypoint R-CNN: Faster R-CNN plus the keypoint branch (8 x 512 convs, 56x56 maps)."""
    return build_rcnn(backbone, num_classes, num_keypoints=num_keypoints, **kwargs)
