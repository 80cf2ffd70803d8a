"""Chollet's original Xception, laid out as timm's `legacy_xception` (timm/models/xception.py).

Feature taps: C1 the stem's output (after its ReLU); C2, C3, C4 the outputs of block1,
block2 and block11 *before* the ReLU that starts the next block (timm's `features_only`
hooks that ReLU, so its features are relu(C_k)); C5 the final ReLU's output. Max-pools
do the downsampling, so only output_stride 32 exists: dilating them would not be exact.
"""
from functools import partial

from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.layers import BatchNorm, Conv, ModuleDef, SeparableConv, max_pool
from flaxbones.registry import register_backbone
from flaxbones.weights.source import WeightSource, timm_eval


class Block(nn.Module):
    """`reps` x (ReLU, separable conv, BN), a 3x3/`stride` max-pool, and a 1x1 conv shortcut.

    Submodules are named by their index in timm's `rep` Sequential (`rep_1`, `rep_2`, ...).
    """

    features: int
    reps: int
    stride: int = 1
    start_with_relu: bool = True
    grow_first: bool = True
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    pool: ModuleDef = max_pool

    @nn.compact
    def __call__(self, x):
        in_chs, y, index = x.shape[-1], x, 0
        for i in range(self.reps):
            if self.grow_first:
                out_chs = self.features
            else:
                out_chs = in_chs if i < self.reps - 1 else self.features
            if i > 0 or self.start_with_relu:
                y, index = nn.relu(y), index + 1
            y = SeparableConv(out_chs, conv=self.conv, norm=None, name=f"rep_{index}")(y)
            y = self.norm(name=f"rep_{index + 1}")(y)
            index += 2
        if self.stride != 1:
            y = self.pool(y, 3, self.stride, padding=1)
        if self.stride != 1 or in_chs != self.features:
            x = self.conv(self.features, (1, 1), (self.stride, self.stride), padding="VALID",
                          name="skip")(x)
            x = self.norm(name="skipbn")(x)
        return y + x


class Xception(Backbone):
    """Chollet's Xception backbone returning {C1..C5} (see the module docstring for the taps).

    Only `output_stride=32`; any other raises a ValueError at construction.
    """

    supported_strides = (32,)  # max-pools downsample; dilating them would not be exact

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        infos = [FeatureInfo(f"C{i + 1}", 2 ** (i + 1), c)
                 for i, c in enumerate((64, 128, 256, 728, 2048))]
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=7)
        info = self.feature_info
        conv = self.conv_def()
        norm = self.norm_def(train)
        x = nn.relu(norm(name="bn1")(conv(32, (3, 3), (2, 2), padding="VALID", name="conv1")(x)))
        x = nn.relu(norm(name="bn2")(conv(64, (3, 3), padding="VALID", name="conv2")(x)))
        feats = {"C1": x}
        block = partial(self.block_def(Block), conv=conv, norm=norm, pool=self.pool_def())
        x = block(128, 2, 2, start_with_relu=False, name="block1")(x)
        feats["C2"] = x
        x = feats["C3"] = block(256, 2, 2, name="block2")(x)
        x = block(728, 2, 2, name="block3")(x)
        for i in range(4, 12):
            x = block(728, 3, 1, name=f"block{i}")(x)
        feats["C4"] = x
        x = block(1024, 2, 2, grow_first=False, name="block12")(x)
        for i, features in ((3, 1536), (4, 2048)):
            x = SeparableConv(features, conv=conv, norm=None, name=f"conv{i}")(x)
            x = nn.relu(norm(name=f"bn{i}")(x))
        feats["C5"] = x
        return {f.name: feats[f.name] for f in info}


# timm's legacy_xception (.tf_in1k, ported from Keras): conv1/pointwise in its separable convs.
TIMM_LEGACY_XCEPTION = WeightSource(
    "timm",
    rules=(
        (r"(conv[12]|bn[1-4])", r"backbone/\1"),
        (r"(conv[34])\.conv1", r"backbone/\1/conv_dw"),
        (r"(conv[34])\.pointwise", r"backbone/\1/conv_pw"),
        (r"block(\d+)\.rep\.(\d+)\.conv1", r"backbone/block\1/rep_\2/conv_dw"),
        (r"block(\d+)\.rep\.(\d+)\.pointwise", r"backbone/block\1/rep_\2/conv_pw"),
        (r"block(\d+)\.rep\.(\d+)", r"backbone/block\1/rep_\2"),
        (r"block(\d+)\.(skip|skipbn)", r"backbone/block\1/\2"),
    ),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **timm_eval(299, 0.8975),
)


@register_backbone("xception", weights=TIMM_LEGACY_XCEPTION)
def xception(**kwargs) -> Xception:
    """Chollet's Xception (timm `legacy_xception`); output_stride 32 only."""
    return Xception(**kwargs)
