"""MobileNet V2 in torchvision's layout: `features.0` stem, `features.1..17` inverted
residuals, `features.18` the 1x1 conv to 1280 channels; flax modules are named `features_N`."""
from functools import partial

from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers import ConvNormAct, InvertedResidual, make_divisible
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# t (expansion), c (channels), n (blocks), s (stride of the first): torchvision's table.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(Backbone):
    """MobileNet V2 backbone, channels rounded exactly as torchvision for any `width_mult`.

    C1..C5 are the last unit at strides 2..32: `features.1, .3, .6, .13, .18` (C5 includes the
    final 1x1 conv, as torchvision's `features` does). `out_features` may also name any unit
    ('features_4'). `output_stride` 8/16 dilates the depthwise convs with torchvision/timm
    semantics (the first block of a dilated stage keeps the previous dilation);
    `whole_stage_dilation` dilates that block too (segmentation_models_pytorch's
    `make_dilated`).
    """

    width_mult: float = 1.0
    round_nearest: int = 8
    whole_stage_dilation: bool = option(False)

    @property
    def _units(self):
        """(stride, channels, expansion) per unit of torchvision's `features`."""
        def width(c):
            return make_divisible(c * self.width_mult, self.round_nearest)
        units = [(2, width(32), None)]
        for t, c, n, s in SETTINGS:
            units += [(s if i == 0 else 1, width(c), t) for i in range(n)]
        last = make_divisible(1280 * max(1.0, self.width_mult), self.round_nearest)
        return units + [(1, last, None)]

    @property
    def _taps(self):
        strides, channels, _ = zip(*self._units)
        plans = plan_output_stride(strides, self.output_stride)
        if self.whole_stage_dilation:
            plans = [p._replace(first_dilation=p.dilation) for p in plans]
        names = [f"features_{i}" for i in range(len(strides))]
        return plans, sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps[1].values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, taps = self._taps
        conv = self.conv_def()
        norm = self.norm_def(train)
        unit, block = self.block_def(ConvNormAct), self.block_def(InvertedResidual)
        outputs = []
        for n, ((_, channels, t), plan) in enumerate(zip(self._units, plans)):
            if t is None:
                k = 3 if n == 0 else 1
                x = unit(channels, k, plan.stride, conv=conv, norm=norm, act=nn.relu6,
                         name=f"features_{n}")(x)
            else:
                x = block(channels, int(round(x.shape[-1] * t)), 3, plan.stride,
                          plan.first_dilation, act=nn.relu6, conv=conv, norm=norm,
                          name=f"features_{n}")(x)
            outputs.append(x)
        return {name: outputs[i] for name, (i, _) in taps.items()}


# features.1 has no expand conv, so its torch indices are one lower than the other blocks'.
TORCH_MOBILENET_V2 = WeightSource(
    "torchvision",
    rules=(
        (r"features\.(\d+)\.0", r"backbone/features_\1/conv"),
        (r"features\.(\d+)\.1", r"backbone/features_\1/bn"),
        (r"features\.1\.conv\.0\.0", r"backbone/features_1/dw/conv"),
        (r"features\.1\.conv\.0\.1", r"backbone/features_1/dw/bn"),
        (r"features\.1\.conv\.1", r"backbone/features_1/project/conv"),
        (r"features\.1\.conv\.2", r"backbone/features_1/project/bn"),
        (r"features\.(\d+)\.conv\.0\.0", r"backbone/features_\1/expand/conv"),
        (r"features\.(\d+)\.conv\.0\.1", r"backbone/features_\1/expand/bn"),
        (r"features\.(\d+)\.conv\.1\.0", r"backbone/features_\1/dw/conv"),
        (r"features\.(\d+)\.conv\.1\.1", r"backbone/features_\1/dw/bn"),
        (r"features\.(\d+)\.conv\.2", r"backbone/features_\1/project/conv"),
        (r"features\.(\d+)\.conv\.3", r"backbone/features_\1/project/bn"),
    ),
    **TORCH_IMAGENET,
)

register_variants("mobilenet_v2", weights=TORCH_MOBILENET_V2, variants={
    "mobilenet_v2_050": partial(MobileNetV2, width_mult=0.5),
    "mobilenet_v2_075": partial(MobileNetV2, width_mult=0.75),
    "mobilenet_v2_140": partial(MobileNetV2, width_mult=1.4),
})
# torchvision's default weights (IMAGENET1K_V2) evaluate at 232 -> 224.
register_variants("mobilenet_v2", weights=TORCH_MOBILENET_V2.replace(resize_size=232), variants={
    "mobilenet_v2": MobileNetV2,
})
