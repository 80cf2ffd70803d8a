"""U-Net decoder over C1..C5 of any backbone (segmentation_models_pytorch's layout)."""
from typing import Sequence

from flax import linen as nn
import jax.numpy as jnp

from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import ConvNormAct, resize_nearest


class UNetHead(SegmentationHead):
    """From the deepest level up: nearest-upsample to the next skip level's size, concat,
    two 3x3 conv-BN-ReLU (`block_i`); a last block at twice the finest level's size, no
    skip; 3x3 `classifier`. One entry of `decoder_channels` per level."""

    in_levels: Sequence[str] = ("C1", "C2", "C3", "C4", "C5")
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)

    @property
    def levels(self):
        return tuple(self.in_levels)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        if len(self.decoder_channels) != len(self.in_levels):
            raise ValueError(f"U-Net needs one decoder width per level: {len(self.in_levels)} "
                             f"levels {tuple(self.in_levels)}, got {tuple(self.decoder_channels)}")
        block = dict(conv=self.conv_def(), norm=self.norm_def(train))
        unit = self.block_def(ConvNormAct)
        skips = [features[n] for n in reversed(self.in_levels)]
        x = skips[0]
        for i, width in enumerate(self.decoder_channels):
            if i + 1 < len(skips):
                skip = skips[i + 1]
                x = jnp.concatenate([resize_nearest(x, skip.shape[1:3]), skip], axis=-1)
            else:
                x = resize_nearest(x, (2 * x.shape[1], 2 * x.shape[2]))
            x = unit(width, 3, **block, name=f"block{i}_0")(x)
            x = unit(width, 3, **block, name=f"block{i}_1")(x)
        classifier = self.classifier_def(kernel_size=(3, 3), padding=((1, 1), (1, 1)))
        return classifier(name="classifier")(x)
