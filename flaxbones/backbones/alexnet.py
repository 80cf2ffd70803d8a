"""AlexNet as torchvision builds it (the one-GPU 'one weird trick' variant, 64-192-384-256-256)."""
from functools import partial

from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.layers import Activated, torch_bias_init, torch_default_init
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# name, width, kernel, stride, padding of each conv; a 3x3 stride-2 max-pool follows conv1, 2, 5.
CONVS = (("conv1", 64, 11, 4, 2), ("conv2", 192, 5, 1, 2), ("conv3", 384, 3, 1, 1),
         ("conv4", 256, 3, 1, 1), ("conv5", 256, 3, 1, 1))
POOLED = ("conv1", "conv2", "conv5")
TAPS = {"conv1": "C2", "conv2": "C3", "conv5": "C4"}  # the last ReLU at strides 4, 8, 16


class AlexNet(Backbone):
    """AlexNet backbone. Strides 4, 8, 16, 32 exist, so it returns C2 (conv1), C3 (conv2),
    C4 (conv5, the deepest activation at stride 16) and C5 (pool5), ReLU'd as torch.

    Only output_stride 32; inputs of at least 63x63 (torchvision's minimum). Convs have
    biases and torch's default init; there is no BatchNorm. Each conv and its ReLU form
    one `layers.Activated` unit (variables at `convN/`, as the bare conv's).
    """

    supported_strides = (32,)
    conv_init = staticmethod(torch_default_init)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        infos = [FeatureInfo("C2", 4, 64), FeatureInfo("C3", 8, 192),
                 FeatureInfo("C4", 16, 256), FeatureInfo("C5", 32, 256)]
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=63)
        info = self.feature_info
        pool, unit = self.pool_def(), self.block_def(Activated)
        feats = {}
        for name, width, k, stride, pad in CONVS:
            conv = self.conv_def(use_bias=True, bias_init=torch_bias_init(k * k * x.shape[-1]))
            x = unit(partial(conv, width, (k, k), (stride, stride),
                             padding=((pad, pad), (pad, pad))), name=name)(x)
            if name in TAPS:
                feats[TAPS[name]] = x
            if name in POOLED:
                x = pool(x, 3, 2)
        feats["C5"] = x
        return {f.name: feats[f.name] for f in info}


TORCH_ALEXNET = WeightSource("torchvision", rules=tuple(
    (rf"features\.{i}", f"backbone/{c[0]}") for i, c in zip((0, 3, 6, 8, 10), CONVS)),
    **TORCH_IMAGENET)

register_variants("alexnet", weights=TORCH_ALEXNET, variants={"alexnet": AlexNet})
