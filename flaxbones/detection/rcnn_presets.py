"""torchvision's R-CNN presets under its names, with WeightSources mapping its detection
state dicts (`backbone.body.*`, `backbone.fpn.*`, `rpn.*`, `roi_heads.*`) onto `RCNN`.

Each preset is built as torchvision builds it for its COCO weights: v1 ResNet presets run
FrozenBatchNorm with epsilon 0 (`overwrite_eps`), the MobileNetV3 ones FrozenBatchNorm with
its default 1e-5, v2 presets ordinary BatchNorm (eps 1e-5) everywhere. `trainable_layers`
defaults to torchvision's 3. Transform defaults ride on the WeightSource (`transform`).
Legacy keys (files saved before torchvision's module versions 2, as its COCO files) map too.
"""
from flaxbones.backbones import mobilenet_v3
from flaxbones.detection.base import fpn_rules, torchvision_detector_source
from flaxbones.detection.rcnn import build_rcnn
from flaxbones.registry import register_model
from flaxbones.segmenters import backbone_rules
from flaxbones.weights.source import WeightSource

HEADS = ("roi_heads/box_predictor/", "roi_heads/mask_predictor/",
         "roi_heads/keypoint_predictor/")  # what `skip_head` may leave at init (class-specific)
RESNET50 = backbone_rules("resnet50", prefix=r"backbone\.body\.")
MOBILENET = mobilenet_v3.torch_rules(mobilenet_v3.LARGE, src=r"backbone\.body")


def rcnn_rules(backbone: tuple, box_head: str = "mlp", mask: bool = False,
               keypoints: bool = False) -> tuple:
    """Key rules of a torchvision R-CNN state dict with `backbone` rules (`backbone.body.`)."""
    rh = r"roi_heads\."
    rules = [*backbone, *fpn_rules(),
             (r"rpn\.head\.conv\.(\d+)\.0", r"rpn/head/conv_\1"),
             (r"rpn\.head\.conv", "rpn/head/conv_0"),  # RPNHead version 1
             (r"rpn\.head\.(cls_logits|bbox_pred)", r"rpn/head/\1"),
             (rh + r"box_predictor\.(cls_score|bbox_pred)", r"roi_heads/box_predictor/\1")]
    if box_head == "mlp":
        rules.append((rh + r"box_head\.(fc6|fc7)", r"roi_heads/box_head/\1"))
    else:  # FastRCNNConvFCHead: 4 conv-BN blocks, Flatten (4), Linear (5), ReLU
        rules += [(rh + r"box_head\.([0-3])\.0", r"roi_heads/box_head/conv\1/conv"),
                  (rh + r"box_head\.([0-3])\.1", r"roi_heads/box_head/conv\1/bn"),
                  (rh + r"box_head\.5", "roi_heads/box_head/fc0")]
    if mask:
        rules += [(rh + r"mask_head\.(\d)\.0", r"roi_heads/mask_head/conv\1/conv"),
                  (rh + r"mask_head\.(\d)\.1", r"roi_heads/mask_head/conv\1/bn"),
                  *((rh + rf"mask_head\.mask_fcn{i + 1}", f"roi_heads/mask_head/conv{i}/conv")
                    for i in range(4)),  # MaskRCNNHeads version 1
                  (rh + r"mask_predictor\.(conv5_mask|mask_fcn_logits)",
                   r"roi_heads/mask_predictor/\1")]
    if keypoints:  # KeypointRCNNHeads: Sequential(conv, relu) x 8
        rules += [*((rh + rf"keypoint_head\.{2 * i}", f"roi_heads/keypoint_head/conv{i}/conv")
                    for i in range(8)),
                  (rh + r"keypoint_predictor\.(kps_score_lowres)",
                   r"roi_heads/keypoint_predictor/\1")]
    return tuple(rules)


def torchvision_source(rules, num_classes: int = 91, min_size: int = 800,
                       max_size: int = 1333) -> WeightSource:
    """torchvision's COCO R-CNN weights: ImageNet normalisation, its resize rule."""
    return torchvision_detector_source(
        rules, num_classes, (("min_size", min_size), ("max_size", max_size),
                             ("size_divisible", 32)), head_prefix=HEADS)


_V1 = dict(bn_epsilon=0.0)  # the v1 COCO weights' overwrite_eps(model, 0.0)
_V2 = dict(frozen_bn=False, fpn_norm=True, rpn_conv_depth=2, box_head="conv")


@register_model("detector", torchvision_source(rcnn_rules(RESNET50)))
def fasterrcnn_resnet50_fpn(num_classes: int = 91, trainable_layers: int = 3, **kwargs):
    """torchvision's Faster R-CNN ResNet-50 FPN (v1: FrozenBN eps 0, TwoMLPHead)."""
    return build_rcnn("resnet50", num_classes, trainable_layers=trainable_layers,
                      **{**_V1, **kwargs})


@register_model("detector", torchvision_source(rcnn_rules(RESNET50, "conv")))
def fasterrcnn_resnet50_fpn_v2(num_classes: int = 91, trainable_layers: int = 3, **kwargs):
    """torchvision's Faster R-CNN ResNet-50 FPN v2: BN backbone and FPN, 2-conv RPN head,
    4conv1fc box head with BN."""
    return build_rcnn("resnet50", num_classes, trainable_layers=trainable_layers,
                      **{**_V2, **kwargs})


def _mobilenet(num_classes, trainable_layers, **kwargs):
    """torchvision's MobileNetV3-Large FPN: FPN over features.13 and features.16 (both
    stride 32) + pooled level, 5 sizes x 3 ratios on each, RPN score threshold 0.05."""
    levels = ("features_13", "C5")
    defaults = dict(fpn_levels=levels, out_features=levels, bn_epsilon=1e-5,
                    anchor_sizes=((32, 64, 128, 256, 512),) * 3,
                    aspect_ratios=((0.5, 1.0, 2.0),) * 3, rpn_score_thresh=0.05)
    return build_rcnn("mobilenet_v3_large", num_classes, trainable_layers=trainable_layers,
                      **{**defaults, **kwargs})


@register_model("detector", torchvision_source(rcnn_rules(MOBILENET)))
def fasterrcnn_mobilenet_v3_large_fpn(num_classes: int = 91, trainable_layers: int = 3,
                                      **kwargs):
    """torchvision's Faster R-CNN MobileNetV3-Large FPN (transform 800 / 1333)."""
    return _mobilenet(num_classes, trainable_layers, **kwargs)


@register_model("detector", torchvision_source(rcnn_rules(MOBILENET), min_size=320,
                                               max_size=640))
def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int = 91, trainable_layers: int = 3,
                                          **kwargs):
    """torchvision's low-resolution variant: transform 320 / 640, RPN top-n 150 / 150."""
    return _mobilenet(num_classes, trainable_layers, **{
        "rpn_pre_nms_top_n": 150, "rpn_post_nms_top_n": 150, **kwargs})


@register_model("detector", torchvision_source(rcnn_rules(RESNET50, mask=True)))
def maskrcnn_resnet50_fpn(num_classes: int = 91, trainable_layers: int = 3, **kwargs):
    """torchvision's Mask R-CNN ResNet-50 FPN (v1: FrozenBN eps 0, plain mask head)."""
    return build_rcnn("resnet50", num_classes, trainable_layers=trainable_layers,
                      mask="plain", **{**_V1, **kwargs})


@register_model("detector", torchvision_source(rcnn_rules(RESNET50, "conv", mask=True)))
def maskrcnn_resnet50_fpn_v2(num_classes: int = 91, trainable_layers: int = 3, **kwargs):
    """torchvision's Mask R-CNN ResNet-50 FPN v2 (the v2 parts, mask head with BN)."""
    return build_rcnn("resnet50", num_classes, trainable_layers=trainable_layers, mask="bn",
                      **{**_V2, **kwargs})


@register_model("detector", torchvision_source(rcnn_rules(RESNET50, keypoints=True),
                                               num_classes=2).replace(labels="coco_person"))
def keypointrcnn_resnet50_fpn(num_classes: int = 2, num_keypoints: int = 17,
                              trainable_layers: int = 3, **kwargs):
    """torchvision's Keypoint R-CNN ResNet-50 FPN (FrozenBN eps 0; person + background,
    17 COCO keypoints; eval transform min_size 800, the last of its training sizes)."""
    return build_rcnn("resnet50", num_classes, trainable_layers=trainable_layers,
                      num_keypoints=num_keypoints, **{**_V1, **kwargs})
