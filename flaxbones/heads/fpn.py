"""Feature Pyramid Network neck (torchvision's layout) and a semantic-FPN head on it."""
from functools import partial
from typing import Callable, Sequence

from flax import linen as nn

from flaxbones.features import FeatureInfo
from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import ConvNormAct, ConvNormModule, resize_bilinear, resize_nearest

# torchvision's FPN init: kaiming_uniform(a=1), zero bias.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
EXTRAS = (None, "pool", "p6p7", "p6p7_c5")
_EXTRA_LEVELS = {None: 0, "pool": 1, "p6p7": 2, "p6p7_c5": 2}  # outputs each extra adds
# torchvision.ops.FeaturePyramidNetwork's keys (under a model's own prefix) -> FPN paths.
TORCHVISION_FPN_RULES = (
    (r"inner_blocks\.(\d)\.0", r"lateral_\1"),
    (r"layer_blocks\.(\d)\.0", r"output_\1"),
    (r"extra_blocks\.(p6|p7)", r"\1"),
    (r"inner_blocks\.(\d)\.1", r"lateral_\1_bn"),  # the conv-BN FPN (`norm=True`)
    (r"layer_blocks\.(\d)\.1", r"output_\1_bn"),
    # files saved before torchvision's FPN version 2 (its COCO detectors'): no `.0` level
    (r"inner_blocks\.(\d)", r"lateral_\1"),
    (r"layer_blocks\.(\d)", r"output_\1"),
)


class FPN(ConvNormModule):
    """Lateral 1x1 convs (`lateral_i`), nearest top-down sums, 3x3 output convs
    (`output_i`): {C2..C5} -> {P2..P5} with `features` channels each, any input size.

    `extra='pool'` adds P6 = stride-2 subsampling of P5 (torchvision's LastLevelMaxPool,
    Faster R-CNN); `extra='p6p7'` adds P6 = 3x3/2 conv of P5 and P7 = 3x3/2 conv of
    ReLU(P6) (RetinaNet, named `p6`, `p7`); `extra='p6p7_c5'` computes P6 from the last input
    level instead (torchvision's LastLevelP6P7(2048, 256), RetinaNet v2). Usable alone as a
    detection neck.
    Convs have biases and torchvision's FPN init; there is no normalisation unless `norm`:
    then every conv is bias-free and followed by a BatchNorm (`lateral_i_bn`, `output_i_bn`),
    torchvision's `norm_layer=BatchNorm2d` FPN of the v2 detectors (run with `train`).
    `names` renames the outputs (extras included), e.g. for input levels that are not
    C-levels (torchvision's MobileNetV3 detectors read `features_13` and C5).
    `remat` rematerialises the neck as one unit: its only stored activations are the
    top-down sums the output convs read, which no per-conv remat could drop.
    """

    in_levels: Sequence[str] = ("C2", "C3", "C4", "C5")
    features: int = 256
    extra: str | None = None
    norm: bool = False
    names: Sequence[str] | None = None

    conv_init = staticmethod(fpn_init)

    def out_levels(self) -> tuple[str, ...]:
        if self.names is not None:
            return tuple(self.names)
        names = tuple("P" + n[1:] for n in self.in_levels)
        last = int(self.in_levels[-1][1:])
        more = _EXTRA_LEVELS[self.extra]
        return names + tuple(f"P{last + i}" for i in range(1, more + 1))

    def feature_info(self, backbone_info) -> tuple[FeatureInfo, ...]:
        """The P-levels this neck returns on a backbone with `backbone_info` (before init)."""
        strides = {f.name: f.stride for f in backbone_info}
        missing = [n for n in self.in_levels if n not in strides]
        if missing:
            raise ValueError(f"FPN needs levels {list(self.in_levels)}; "
                             f"the backbone lacks {missing}")
        out = [strides[n] for n in self.in_levels]
        out += [out[-1] * 2 ** i for i in range(1, len(self.out_levels()) - len(out) + 1)]
        return tuple(FeatureInfo(n, s, self.features) for n, s in zip(self.out_levels(), out))

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        if self.extra not in EXTRAS:
            raise ValueError(f"unknown FPN extra {self.extra!r}; choose one of {EXTRAS}")
        outputs = len(self.in_levels) + _EXTRA_LEVELS[self.extra]
        if self.names is not None and len(self.names) != outputs:
            raise ValueError(f"FPN names {tuple(self.names)} must name every output level "
                             f"({len(self.in_levels)} inputs + extra {self.extra!r})")
        conv = partial(self.conv_def(use_bias=not self.norm), self.features)
        norm = self.norm_def(train) if self.norm else None
        body = self.block_def(_Pyramid)(conv, self.extra, norm)
        nn.share_scope(self, body)
        return dict(zip(self.out_levels(), body([features[n] for n in self.in_levels])))


class _Pyramid(nn.Module):
    """The FPN's computation on its input levels (finest first), run in the FPN's scope."""

    conv: Callable
    extra: str | None
    norm: Callable | None = None

    def _conv_norm(self, x, name, *args, **kwargs):
        x = self.conv(*args, name=name, **kwargs)(x)
        return x if self.norm is None else self.norm(name=f"{name}_bn")(x)

    @nn.compact
    def __call__(self, levels):
        pad = ((1, 1), (1, 1))
        outs, top = [], None
        for i in reversed(range(len(levels))):
            x = self._conv_norm(levels[i], f"lateral_{i}", (1, 1))
            top = x if top is None else x + resize_nearest(top, x.shape[1:3])
            outs.insert(0, self._conv_norm(top, f"output_{i}", (3, 3), padding=pad))
        if self.extra == "pool":
            outs.append(outs[-1][:, ::2, ::2])
        elif self.extra in ("p6p7", "p6p7_c5"):
            src = outs[-1] if self.extra == "p6p7" else levels[-1]
            p6 = self.conv((3, 3), (2, 2), padding=pad, use_bias=True, name="p6")(src)
            outs += [p6, self.conv((3, 3), (2, 2), padding=pad, use_bias=True,
                                   name="p7")(nn.relu(p6))]
        return outs


class SemanticFPNHead(SegmentationHead):
    """Panoptic FPN's semantic branch (detectron2's SemSegFPNHead): per P-level, 3x3
    conv-GN-ReLU of `channels` and 2x bilinear upsampling until P2's size, summed, 1x1
    `classifier`; logits at P2's stride. Upsampling goes to the next level's exact
    size, so any input size works."""

    in_levels: Sequence[str] = ("C2", "C3", "C4", "C5")
    fpn_channels: int = 256
    channels: int = 128
    groups: int = 32

    @property
    def levels(self):
        return tuple(self.in_levels)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        pyramid = FPN(self.in_levels, self.fpn_channels, dtype=self.dtype,
                      param_dtype=self.param_dtype, cpu_kernels=self.cpu_kernels,
                      remat=self.remat, name="fpn")(features)
        maps = [pyramid["P" + n[1:]] for n in self.in_levels]
        norm = partial(nn.GroupNorm, num_groups=self.groups, epsilon=1e-5, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        conv, unit = self.conv_def(), self.block_def(ConvNormAct)
        total = 0
        for i, x in enumerate(maps):
            for j in range(max(i, 1)):
                x = unit(self.channels, 3, conv=conv, norm=norm, name=f"scale{i}_{j}")(x)
                if i > 0:
                    x = resize_bilinear(x, maps[i - 1 - j].shape[1:3])
            total = total + x
        return self.classifier_def()(name="classifier")(total)
