"""ResNet, ResNeXt and Wide ResNet (torchvision v1.5 layout: stride on the 3x3 conv), and
timm's ResNet-D (deep 3x3 stem, average-pool shortcut downsampling)."""
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.layers import BatchNorm, Conv, ModuleDef, loop_conv, torch_padding
from flaxbones.registry import register_variants
from flaxbones.scan import scan_repeat
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource, timm_eval


def _downsample(x, features, stride, conv, norm, avg_down=False, dilation=1):
    """The 1x1 conv + BN projection shortcut (torch's `downsample.0/.1`); with `avg_down`
    (ResNet-D, timm's `downsample.1/.2`) a stride-1 conv after timm's 2x2 average pool:
    stride 2 with ceil_mode (a partial edge window averages what it covers), or, in a
    dilated stage, stride 1 with one zero row and column padded after ('same')."""
    if avg_down and dilation > 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = nn.avg_pool(x, (2, 2), padding="VALID")
    elif avg_down and stride > 1:
        pads = tuple((0, n % 2) for n in x.shape[1:3])
        x = nn.avg_pool(x, (2, 2), (2, 2), padding=pads, count_include_pad=False)
    if avg_down:
        stride = 1
    x = conv(features, (1, 1), (stride, stride), padding="VALID", name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs. Dilated like timm: conv1 uses `first_dilation`, conv2 `dilation`."""

    planes: int
    stride: int = 1
    first_dilation: int = 1
    dilation: int = 1
    groups: int = 1
    base_width: int = 64
    avg_down: bool = False
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    expansion = 1

    @nn.compact
    def __call__(self, x):
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        s, d1, d2 = self.stride, self.first_dilation, self.dilation
        y = self.conv(self.planes, (3, 3), (s, s), padding=torch_padding(3, s, d1),
                      kernel_dilation=(d1, d1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), padding=torch_padding(3, 1, d2),
                      kernel_dilation=(d2, d2), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if s != 1 or x.shape[-1] != self.planes:
            x = _downsample(x, self.planes, s, self.conv, self.norm, self.avg_down, d2)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups, `first_dilation`) -> 1x1 x4, as torchvision."""

    planes: int
    stride: int = 1
    first_dilation: int = 1
    dilation: int = 1
    groups: int = 1
    base_width: int = 64
    avg_down: bool = False
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    expansion = 4

    @nn.compact
    def __call__(self, x):
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        out = self.planes * self.expansion
        s, d = self.stride, self.first_dilation
        y = nn.relu(self.norm(name="bn1")(self.conv(width, (1, 1), padding="VALID", name="conv1")(x)))
        y = self.conv(width, (3, 3), (s, s), padding=torch_padding(3, s, d), kernel_dilation=(d, d),
                      feature_group_count=self.groups, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.norm(name="bn3")(self.conv(out, (1, 1), padding="VALID", name="conv3")(y))
        if s != 1 or x.shape[-1] != out:
            x = _downsample(x, out, s, self.conv, self.norm, self.avg_down, self.dilation)
        return nn.relu(y + x)


class ResNet(Backbone):
    """ResNet backbone returning {C1: stem, C2..C5: layer1..layer4}.

    `output_stride` 8/16/32 dilates the last stages (torchvision semantics, also for
    basic-block ResNets); `multi_grid` multiplies the last stage's per-block dilation as
    DeepLab does (e.g. (1, 2, 4)). `axis_name` syncs BatchNorm under `pmap`.
    `deep_stem` replaces the 7x7 stem conv by three 3x3 convs of `stem_width`, `stem_width`
    and 2 x `stem_width` channels (timm's `conv1.0/.3/.6`); `avg_down` downsamples shortcuts
    by average pooling before their 1x1 conv: with both, timm's ResNet-D.
    `scan_blocks` runs the identical blocks 1.. of each stage in one `nn.scan` named
    `layerI_scan` (not layer4 under `multi_grid`): same numerics, far faster compiles;
    `flaxbones.scan` converts variables between the two forms.
    `whole_stage_dilation` dilates the first block of a dilated stage like the others
    (segmentation_models_pytorch's `make_dilated`), not at the previous rate (torchvision).
    """

    block: Any
    layers: Sequence[int]
    groups: int = 1
    width_per_group: int = 64
    deep_stem: bool = False
    stem_width: int = 64
    avg_down: bool = False
    scan_blocks: bool = option(False)
    whole_stage_dilation: bool = option(False)

    @nn.nowrap
    def multi_grid_units(self) -> int:
        return self.layers[-1]

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        """{scanned module: unscanned blocks}: every stage's blocks after the first."""
        return {f"layer{i + 1}_scan": [f"layer{i + 1}_{j}" for j in range(1, n)]
                for i, n in enumerate(self.layers)
                if n > 1 and not (i == 3 and self.multi_grid is not None)}

    # stem conv, max-pool, layer1..layer4
    def _plans(self):
        plans = plan_output_stride((2, 2, 1, 2, 2, 2), self.output_stride)
        if self.whole_stage_dilation:
            return [p._replace(first_dilation=p.dilation) for p in plans]
        return plans

    @property
    def _stem_channels(self) -> int:
        return 2 * self.stem_width if self.deep_stem else self.stem_width

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        plans, stride = self._plans(), 1
        strides = [stride := stride * p.stride for p in plans]
        widths = [self._stem_channels] + [w * self.block.expansion for w in (64, 128, 256, 512)]
        stage_strides = [strides[0]] + strides[2:]
        infos = [FeatureInfo(f"C{i + 1}", s, c) for i, (s, c) in enumerate(zip(stage_strides, widths))]
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        info = self.feature_info
        conv = self.conv_def()
        norm = self.norm_def(train)
        if self.deep_stem:
            for i, (width, stride) in enumerate(((self.stem_width, 2), (self.stem_width, 1))):
                x = conv(width, (3, 3), (stride, stride), padding=torch_padding(3),
                         name=f"conv1_{3 * i}")(x)
                x = nn.relu(norm(name=f"conv1_{3 * i + 1}")(x))
            x = conv(self._stem_channels, (3, 3), padding=torch_padding(3), name="conv1_6")(x)
        else:
            x = conv(self._stem_channels, (7, 7), (2, 2), padding=torch_padding(7), name="conv1")(x)
        feats = {"C1": nn.relu(norm(name="bn1")(x))}
        x = self.pool_def()(feats["C1"], 3, 2, padding=1)
        plans = self._plans()[2:]
        scanned = self.scan_groups() if self.scan_blocks else {}
        for i, (blocks, planes, plan) in enumerate(zip(self.layers, (64, 128, 256, 512), plans)):
            block = partial(self.block_def(self.block), planes, groups=self.groups,
                            base_width=self.width_per_group, avg_down=self.avg_down,
                            conv=conv, norm=norm)
            for j in range(blocks):
                first, dil = (plan.first_dilation if j == 0 else plan.dilation), plan.dilation
                if self.multi_grid is not None and i == 3:
                    first = dil = plan.dilation * self.multi_grid[j]
                if j == 1 and f"layer{i + 1}_scan" in scanned:
                    x = scan_repeat(partial(block, first_dilation=dil, dilation=dil,
                                            conv=loop_conv(conv)),
                                    blocks - 1, f"layer{i + 1}_scan")(x)
                    break
                x = block(stride=plan.stride if j == 0 else 1, first_dilation=first, dilation=dil,
                          name=f"layer{i + 1}_{j}")(x)
            feats[f"C{i + 2}"] = x
        return {f.name: feats[f.name] for f in info}


# torchvision and timm name ResNets identically: conv1, bn1, layerI.J.* (and the head's fc).
TORCH_RESNET = WeightSource(
    "torchvision",
    rules=(
        (r"(conv1|bn1)", r"backbone/\1"),
        (r"layer(\d)\.(\d+)\.(conv\d|bn\d)", r"backbone/layer\1_\2/\3"),
        (r"layer(\d)\.(\d+)\.downsample\.0", r"backbone/layer\1_\2/downsample_conv"),
        (r"layer(\d)\.(\d+)\.downsample\.1", r"backbone/layer\1_\2/downsample_bn"),
    ),
    **TORCH_IMAGENET,
)


# timm's ResNet-D: the deep stem `conv1.0/.1/.3/.4/.6`, and `downsample.1/.2` after the pool.
TIMM_RESNET_D = WeightSource(
    "timm",
    rules=(
        (r"conv1\.(\d)", r"backbone/conv1_\1"),
        (r"bn1", r"backbone/bn1"),
        (r"layer(\d)\.(\d+)\.(conv\d|bn\d)", r"backbone/layer\1_\2/\3"),
        (r"layer(\d)\.(\d+)\.downsample\.1", r"backbone/layer\1_\2/downsample_conv"),
        (r"layer(\d)\.(\d+)\.downsample\.2", r"backbone/layer\1_\2/downsample_bn"),
    ),
    **TORCH_IMAGENET,
)


register_variants("resnet", weights=TORCH_RESNET, variants={
    "resnet18": partial(ResNet, block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet34": partial(ResNet, block=BasicBlock, layers=(3, 4, 6, 3)),
})
# torchvision's default weights of the bottleneck ResNets (IMAGENET1K_V2) evaluate at 232 -> 224.
register_variants("resnet", weights=TORCH_RESNET.replace(resize_size=232), variants={
    "resnet50": partial(ResNet, block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": partial(ResNet, block=Bottleneck, layers=(3, 4, 23, 3)),
    "resnet152": partial(ResNet, block=Bottleneck, layers=(3, 8, 36, 3)),
    "resnext50_32x4d": partial(ResNet, block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": partial(ResNet, block=Bottleneck, layers=(3, 4, 23, 3), groups=32, width_per_group=8),
    "wide_resnet50_2": partial(ResNet, block=Bottleneck, layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": partial(ResNet, block=Bottleneck, layers=(3, 4, 23, 3), width_per_group=128),
})

for _name, _layers, _eval in (("resnet50d", (3, 4, 6, 3), timm_eval(224, 0.875)),
                              ("resnet101d", (3, 4, 23, 3), timm_eval(256, 0.95))):
    register_variants("resnet", weights=TIMM_RESNET_D.replace(**_eval), variants={
        _name: partial(ResNet, block=Bottleneck, layers=_layers, deep_stem=True, stem_width=32,
                       avg_down=True)})
