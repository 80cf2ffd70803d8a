"""torchvision R-CNN references for the parity tests: each preset built as torchvision builds
it for its COCO weights (FrozenBatchNorm in the backbone, eps 0 for v1), random weights with
non-trivial BN statistics (`calibrate`), heads scaled to a fixed output spread (`tame`),
and its pieces run one by one (`run`)."""
import numpy as np
import torch
from torchvision.models import detection as tvd
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops.misc import FrozenBatchNorm2d

import torch_ref

# preset -> (torchvision's weights enum, v1 eps-0 weights, its backbone runs FrozenBatchNorm)
PRESETS = {
    "fasterrcnn_resnet50_fpn": (tvd.FasterRCNN_ResNet50_FPN_Weights, True, True),
    "fasterrcnn_resnet50_fpn_v2": (tvd.FasterRCNN_ResNet50_FPN_V2_Weights, False, False),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        tvd.FasterRCNN_MobileNet_V3_Large_FPN_Weights, False, True),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights, False, True),
    "maskrcnn_resnet50_fpn": (tvd.MaskRCNN_ResNet50_FPN_Weights, True, True),
    "maskrcnn_resnet50_fpn_v2": (tvd.MaskRCNN_ResNet50_FPN_V2_Weights, False, False),
    "keypointrcnn_resnet50_fpn": (tvd.KeypointRCNN_ResNet50_FPN_Weights, True, True),
}
MIN_SIZE, MAX_SIZE = 64, 128  # MobileNet presets: 320 / 640, so their stride-32 levels hold
# more anchors than the RPN top-n (1000, and 150 for the 320 preset) and the cut is tested


def sizes(name: str) -> dict:
    small = (320, 640) if "mobilenet" in name else (MIN_SIZE, MAX_SIZE)
    return dict(zip(("min_size", "max_size"), small))
# The presets with conv box heads or mask/keypoint branches run fewer RoIs (both sides), to
# keep the tests' CPU time modest: (torchvision's kwargs, flaxbones' kwargs).
LIGHT = (dict(rpn_post_nms_top_n_test=300, box_detections_per_img=25),
         dict(rpn_post_nms_top_n=300, detections_per_img=25))


def settings(name: str) -> tuple[dict, dict]:
    heavy = name.endswith("_v2") or not name.startswith("fasterrcnn")
    return LIGHT if heavy else ({}, {})


def freeze_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every BatchNorm2d below `module` for a FrozenBatchNorm2d with its statistics (what
    torchvision's builders use when they load weights)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_bn(child)
    return module


def build(name: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """torchvision's `name` as its COCO weights run it, with random tamed weights, eval mode."""
    _, v1, frozen = PRESETS[name]
    torch.manual_seed(seed)
    model = getattr(tvd, name)(weights=None, weights_backbone=None, num_classes=num_classes,
                               **sizes(name), **settings(name)[0])
    torch_ref.randomize(model, seed)
    calibrate(model, images(), seed)
    if frozen:
        freeze_bn(model.backbone.body)
        # FrozenBatchNorm2d's default eps (MobileNetV3 detection), or the v1 weights' 0.0
        overwrite_eps(model, 0.0 if v1 else 1e-5)
    return tame(model.eval(), images())


def calibrate(model, imgs, seed: int = 0):
    """Backbone BN statistics from the images' own batch statistics, then perturbed (mean by
    0.1 std, variance by x0.7..1.4): non-trivial, yet activations keep their scale and their
    variation across the image. Purely random statistics make deep features nearly
    constant over the image (BN shifts swamp the signal) and scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    body = model.backbone.body
    bns = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        batch, _ = model.transform(imgs)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative: one batch -> its statistics
        body.train()
        body(batch.tensors)
        body.eval()
        for m in bns:
            m.momentum = 0.1
            # no near-dead channel divides by ~0 (FrozenBN eps is 0 for v1)
            m.running_var.clamp_(min=0.1 * m.running_var.mean())
            std = m.running_var.sqrt()
            m.running_mean.add_(0.1 * std * torch.randn(m.num_features, generator=g))
            m.running_var.mul_(0.7 + 0.7 * torch.rand(m.num_features, generator=g))
        for m in _residual_ends(body):  # small residual branches, as trained nets have: random
            m.weight.mul_(0.2)  # unit-variance branches would amplify fp32 noise with depth


def _residual_ends(body):
    """The BN closing each residual branch (ResNet bn3, MobileNet's projection BN)."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import Bottleneck
    for m in body.modules():
        if isinstance(m, Bottleneck):
            yield m.bn3
        elif isinstance(m, InvertedResidual) and m.use_res_connect:
            yield m.block[-1][1]


def _scale(layer, std_now: float, std_want: float):
    with torch.no_grad():
        layer.weight.mul_(std_want / std_now)
        layer.bias.mul_(std_want / std_now)


def tame(model, imgs):
    """Scale each head's last layers so its outputs have a fixed spread on `imgs`: objectness
    std 2, RPN deltas 0.3, class logits 2, box regression 3 (0.3 after the 10/5 weights),
    mask and keypoint logits 2. Random weights then give diverse proposals, detections over
    a range of scores and no exact ties (tiny logits round to equal floats), whatever the
    backbone's activation scale."""
    rh, rpn = model.roi_heads, model.rpn
    with torch.no_grad():
        batch, _ = model.transform(imgs)
        feats = model.backbone(batch.tensors)
        obj, deltas = rpn.head(list(feats.values()))
        _scale(rpn.head.cls_logits, torch.cat([o.flatten() for o in obj]).std(), 2.0)
        _scale(rpn.head.bbox_pred, torch.cat([d.flatten() for d in deltas]).std(), 0.3)
        proposals, _ = rpn(batch, feats)
        x = rh.box_head(rh.box_roi_pool(feats, proposals, batch.image_sizes))
        logits, regression = rh.box_predictor(x)
        _scale(rh.box_predictor.cls_score, logits.std(), 2.0)
        _scale(rh.box_predictor.bbox_pred, regression.std(), 3.0)
        dets, _ = rh(feats, proposals, batch.image_sizes)
        boxes = [d["boxes"] for d in dets]
        if rh.has_mask():
            x = rh.mask_head(rh.mask_roi_pool(feats, boxes, batch.image_sizes))
            _scale(rh.mask_predictor.mask_fcn_logits, rh.mask_predictor(x).std(), 2.0)
        if rh.keypoint_predictor is not None:
            x = rh.keypoint_head(rh.keypoint_roi_pool(feats, boxes, batch.image_sizes))
            _scale(rh.keypoint_predictor.kps_score_lowres, rh.keypoint_predictor(x).std(), 2.0)
    return model


def images(seed: int = 1):
    """Two images of different odd sizes, CHW float in [0, 1]: coarse random blobs plus fine
    noise, so deep features vary across the image (pure noise averages out in large receptive
    fields, and equal features at different places would make exact score ties)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in ((71, 93), (83, 67)):
        coarse = torch.rand(1, 3, 4, 5, generator=g)
        blobs = torch.nn.functional.interpolate(coarse, (h, w), mode="bicubic")[0]
        out.append((0.8 * blobs + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1))
    return out


def run(model: torch.nn.Module, imgs) -> dict:
    """The transform's batch and every stage's outputs as numpy (NHWC / flat as flaxbones)."""
    rh = model.roi_heads
    with torch.no_grad():
        batch, _ = model.transform(imgs)
        feats = model.backbone(batch.tensors)
        levels = list(feats.values())
        objectness, deltas = model.rpn.head(levels)
        proposals, scores = _proposals(model.rpn, batch, levels, objectness, deltas)
        x = rh.box_head(rh.box_roi_pool(feats, proposals, batch.image_sizes))
        class_logits, box_regression = rh.box_predictor(x)
        dets, _ = rh(feats, proposals, batch.image_sizes)
    n = len(imgs)
    return dict(
        images=batch.tensors.numpy().transpose(0, 2, 3, 1),
        image_sizes=np.asarray(batch.image_sizes, np.int32),
        features=[f.numpy().transpose(0, 2, 3, 1) for f in feats.values()],
        objectness=[o.numpy().transpose(0, 2, 3, 1).reshape(n, -1) for o in objectness],
        deltas=[d.numpy().reshape(n, -1, 4, *d.shape[2:]).transpose(0, 3, 4, 1, 2).reshape(n, -1, 4)
                for d in deltas],
        proposals=[p.numpy() for p in proposals], proposal_scores=[s.numpy() for s in scores],
        class_logits=class_logits.numpy(), box_regression=box_regression.numpy(),
        detections=[{k: v.numpy() for k, v in d.items()} for d in dets])


def _proposals(rpn, batch, levels, objectness, deltas):
    """RegionProposalNetwork.forward's eval path, keeping the scores it drops."""
    anchors = rpn.anchor_generator(batch, levels)
    per_level = [o[0].numel() for o in objectness]
    obj, delta = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(delta, anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(boxes, obj, batch.image_sizes, per_level)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
