"""AlexNet as torchvision builds it (the one-GPU 'one weird trick' variant, 64-192-384-256-256)."""
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.heads.classification import FCHead, torch_bias_init, torch_linear_init
from flaxbones.layers import Conv, max_pool
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# name, width, kernel, stride, padding of each conv; a 3x3 stride-2 max-pool follows conv1, 2, 5.
CONVS = (("conv1", 64, 11, 4, 2), ("conv2", 192, 5, 1, 2), ("conv3", 384, 3, 1, 1),
         ("conv4", 256, 3, 1, 1), ("conv5", 256, 3, 1, 1))
POOLED = ("conv1", "conv2", "conv5")
TAPS = {"conv1": "C2", "conv2": "C3", "conv5": "C4"}  # the last ReLU at strides 4, 8, 16


class AlexNet(nn.Module):
    """AlexNet backbone. Strides 4, 8, 16, 32 exist, so it returns C2 (conv1), C3 (conv2),
    C4 (conv5, the deepest activation at stride 16) and C5 (pool5), ReLU'd as torch.

    Only output_stride 32; inputs of at least 63x63 (torchvision's minimum).
    """

    output_stride: int = 32
    out_features: Sequence[str] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        plan_output_stride((4, 2, 2, 2), self.output_stride, supported=(32,))
        infos = [FeatureInfo("C2", 4, 64), FeatureInfo("C3", 8, 192),
                 FeatureInfo("C4", 16, 256), FeatureInfo("C5", 32, 256)]
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=63)
        info = self.feature_info
        feats = {}
        for name, width, k, stride, pad in CONVS:
            x = Conv(width, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=torch_linear_init,
                        bias_init=torch_bias_init(k * k * x.shape[-1]), name=name)(x)
            x = nn.relu(x)
            if name in TAPS:
                feats[TAPS[name]] = x
            if name in POOLED:
                x = max_pool(x, 3, 2)
        feats["C5"] = x
        return {f.name: feats[f.name] for f in info}


TORCH_ALEXNET = WeightSource("torchvision", rules=(
    *((rf"features\.{i}", f"backbone/{c[0]}") for i, c in zip((0, 3, 6, 8, 10), CONVS)),
    (r"classifier\.1", "head/fc6"), (r"classifier\.4", "head/fc7"), (r"classifier\.6", "head/fc8"),
), **TORCH_IMAGENET)

# torchvision's classifier: dropout before fc6 and fc7, torch.nn.Linear's default init.
ALEXNET_HEAD = partial(FCHead, pool_size=6, drop_before_fc=True)

register_variants("alexnet", weights=TORCH_ALEXNET, head=ALEXNET_HEAD,
                  variants={"alexnet": AlexNet})
