"""MNASNet (B1, torchvision's version 2) in torchvision's layout: `layers.0..7` the stem
(3x3 conv, depthwise-separable conv), `layers.8..13` stacks of inverted residuals,
`layers.14/15` the final 1x1 conv to 1280. Flax modules are named `layers_N` (the first
index of each torch unit; blocks `layers_N_I`)."""
from functools import partial

from flax import linen as nn

from flaxbones.backbones.base import Backbone, UnitSequence, option
from flaxbones.features import check_images
from flaxbones.layers import ConvNormAct, InvertedResidual, make_divisible
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
# (kernel, stride, expansion, repeats) of the stacks `layers.8..13`
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
LAST = 1280


class MNASNet(UnitSequence, Backbone):
    """MNASNet backbone (torchvision's; BatchNorm torch momentum 0.0003, as the paper's TF
    0.9997). `alpha` scales every width but the last (rounded as torchvision).

    C1..C5 are the last unit at strides 2..32: `layers.6` (the separable conv's projection),
    `layers.8/9/11/13` stacks' last blocks, C5 including the final 1x1 conv. `output_stride`
    8/16 dilates the strided depthwise convs, timm's semantics (timm's `mnasnet_100` is the
    same network): every conv pads d * (k - 1) / 2 symmetrically, so dilation is exact.
    """

    alpha: float = 1.0
    bn_momentum: float = option(0.9997)

    @property
    def _units(self):
        """(name, stride, channels) of the stem convs, every block and the final conv."""
        d = [make_divisible(c * self.alpha) for c in DEPTHS]
        units = [("layers_0", 2, d[0]), ("layers_3", 1, d[0]), ("layers_6", 1, d[1])]
        for s, (_, stride, _, n) in enumerate(STACKS):
            units += [(f"layers_{8 + s}_{i}", stride if i == 0 else 1, d[s + 2]) for i in range(n)]
        return units + [("layers_14", 1, LAST)]

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, taps = self._taps
        units = self._units
        conv, norm = self.conv_def(), self.norm_def(train)
        unit = partial(self.block_def(ConvNormAct), conv=conv, norm=norm)
        block = partial(self.block_def(InvertedResidual), act=nn.relu, conv=conv, norm=norm)
        x = unit(units[0][2], 3, 2, name="layers_0")(x)
        outputs = [x, unit(units[1][2], 3, groups=units[1][2], name="layers_3")(x)]
        outputs.append(unit(units[2][2], 1, act=None, name="layers_6")(outputs[-1]))
        x, n = outputs[-1], 3
        for k, _, t, repeats in STACKS:
            for _ in range(repeats):
                name, _, width = units[n]
                x = block(width, x.shape[-1] * t, k, plans[n].stride, plans[n].first_dilation,
                          name=name)(x)
                outputs.append(x)
                n += 1
        outputs.append(unit(LAST, 1, name="layers_14")(x))
        return {name: outputs[i] for name, (i, _) in taps.items()}


TORCH_RULES = (
    *((rf"layers\.{i}", f"backbone/layers_{i}/conv") for i in (0, 3, 6, 14)),
    *((rf"layers\.{i + 1}", f"backbone/layers_{i}/bn") for i in (0, 3, 6, 14)),
    *((rf"layers\.(\d+)\.(\d+)\.layers\.{k}", rf"backbone/layers_\1_\2/{part}")
      for k, part in ((0, "expand/conv"), (1, "expand/bn"), (3, "dw/conv"), (4, "dw/bn"),
                      (6, "project/conv"), (7, "project/bn"))),
)

# timm's `mnasnet_100` keys (conv_stem/bn1, blocks.0.0 the separable conv, blocks.S.I the
# stacks, conv_head/bn2) onto the same modules: timm's dilated model checks `output_stride`.
TIMM_RULES = (
    (r"conv_stem", "backbone/layers_0/conv"), (r"bn1", "backbone/layers_0/bn"),
    (r"blocks\.0\.0\.conv_dw", "backbone/layers_3/conv"),
    (r"blocks\.0\.0\.bn1", "backbone/layers_3/bn"),
    (r"blocks\.0\.0\.conv_pw", "backbone/layers_6/conv"),
    (r"blocks\.0\.0\.bn2", "backbone/layers_6/bn"),
    *((rf"blocks\.{s}\.(\d+)\.{a}", rf"backbone/layers_{s + 7}_\1/{b}")
      for s in range(1, 7) for a, b in (
          ("conv_pw", "expand/conv"), ("bn1", "expand/bn"), ("conv_dw", "dw/conv"),
          ("bn2", "dw/bn"), ("conv_pwl", "project/conv"), ("bn3", "project/bn"))),
    (r"conv_head", "backbone/layers_14/conv"), (r"bn2", "backbone/layers_14/bn"),
    (r"classifier", "head/fc"),
)

_TORCH = WeightSource("torchvision", TORCH_RULES, **TORCH_IMAGENET)
register_variants("mnasnet", weights=_TORCH, variants={
    "mnasnet0_5": partial(MNASNet, alpha=0.5),
    "mnasnet1_0": MNASNet,
})
# torchvision's weights for these two evaluate at 232 -> 224.
register_variants("mnasnet", weights=_TORCH.replace(resize_size=232), variants={
    "mnasnet0_75": partial(MNASNet, alpha=0.75),
    "mnasnet1_3": partial(MNASNet, alpha=1.3),
})
