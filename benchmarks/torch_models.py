"""The PyTorch side of each workload: torchvision/timm models, and a DeepLabv3+ built from
torchvision's ASPP pieces and a timm backbone, laid out as flaxbones' head (same
parameter count, checked by the benchmark) since neither library ships DeepLabv3+."""
import torch
import torch.nn.functional as F
from torch import nn


def build(reference: str, num_classes: int) -> nn.Module:
    kind, name = reference.split(":")
    if kind == "torchvision":
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if kind == "timm":
        import timm
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "deeplabv3plus":
        return DeepLabV3Plus(name, num_classes)
    raise ValueError(f"unknown reference {reference!r}")


def _conv_bn_relu(cin, cout, k=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _separable(cin, cout, dilation=1):
    """TF DeepLab's split separable conv: depthwise-BN-ReLU, pointwise-BN-ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin,
                                   bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                         _conv_bn_relu(cin, cout))


class ASPP(nn.Module):
    def __init__(self, cin, rates, separable, pool_first, dropout, channels=256):
        super().__init__()
        atrous = (lambda r: _separable(cin, channels, r)) if separable else (
            lambda r: _conv_bn_relu(cin, channels, 3, r))
        self.convs = nn.ModuleList([_conv_bn_relu(cin, channels)] + [atrous(r) for r in rates])
        self.pool = _conv_bn_relu(cin, channels)
        self.pool_first = pool_first
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels),
                                     nn.Dropout(dropout))
        self.align_corners = separable

    def forward(self, x):
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear",
                               align_corners=self.align_corners)
        branches = [conv(x) for conv in self.convs]
        branches = [pooled, *branches] if self.pool_first else [*branches, pooled]
        return self.project(torch.cat(branches, 1))


class DeepLabV3Plus(nn.Module):
    """flaxbones' deeplabv3plus_resnet101 (torchvision style) or _xception65 (TF style:
    separable convs, pooling first, align_corners), output stride 16, low level at 4."""

    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        import timm
        tf_style = backbone.startswith("xception")
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True,
                                          out_indices=(1, 4), output_stride=16)
        low_ch, high_ch = self.backbone.feature_info.channels()
        self.aspp = ASPP(high_ch, (6, 12, 18), tf_style, tf_style, 0.1 if tf_style else 0.5)
        self.project_low = _conv_bn_relu(low_ch, 48)
        decoder = (lambda i, o: _separable(i, o)) if tf_style else (
            lambda i, o: _conv_bn_relu(i, o, 3))
        self.decoder = nn.Sequential(decoder(256 + 48, 256), decoder(256, 256))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.align_corners = tf_style

    def forward(self, x):
        low, high = self.backbone(x)
        low = self.project_low(low)
        y = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear",
                          align_corners=self.align_corners)
        y = self.classifier(self.decoder(torch.cat([y, low], 1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear",
                             align_corners=self.align_corners)
