"""segmentation_models_pytorch's U-Net++ decoder (smp 0.6) as a head: nested dense skip
paths; every node upsamples by a fixed 2, so image sides must divide by 2**depth."""
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.smp.common import SmpSegmentationHead
from flaxbones.heads.smp.unet import (UnetDecoder, UnetDecoderBlock, UnetOptionsHead,
                                      center_block, center_rules, check_divisible)


class UnetPlusPlusDecoder(UnetDecoder):
    """smp's UnetPlusPlusDecoder on `features` [C1, ..., Cn], with UnetDecoder's options:
    node x_d_j (`blocks_x_d_j`, smp's DecoderBlock = a U-Net block resizing by 2) takes
    x_d_(j-1) (layer 0: level n - d) and the concatenated x_i_j (i > d) and level n - j - 1;
    its width is `decoder_channels[j]` for d = 0, the skip's otherwise; x_0_(n-1) ends
    without a skip. `center` (VGG encoders) holds smp's center block, built but never run,
    as in smp."""

    @nn.compact
    def __call__(self, features: Sequence):
        feats = list(features[::-1])
        if self.center and self.is_initializing():
            center_block(feats[0], self.use_norm, self.conv, self.norm)
        depth = len(self.decoder_channels) - 1

        def node(d, j, x, skip=None):
            width = self.decoder_channels[j] if d == 0 else feats[j + 1].shape[-1]
            size = (2 * x.shape[1], 2 * x.shape[2])
            return self.block(width, self.use_norm, self.attention_type, self.interpolation,
                              self.conv, self.norm, name=f"blocks_x_{d}_{j}")(x, size, skip)

        dense = {}
        for layer in range(depth):
            for d in range(depth - layer):
                j = d + layer
                if layer == 0:
                    dense[d, j] = node(d, j, feats[d], feats[d + 1])
                else:
                    skip = [dense[i, j] for i in range(d + 1, j + 1)] + [feats[j + 1]]
                    dense[d, j] = node(d, j, dense[d, j - 1], jnp.concatenate(skip, axis=-1))
        return node(0, depth, dense[0, depth - 1])


class SmpUnetPlusPlusHead(UnetOptionsHead):
    """smp.UnetPlusPlus's decoder (`decoder`) and segmentation head (3x3 conv,
    `segmentation_head`) on C1..C`encoder_depth`; logits at twice C1's size, the image's.
    Image sides must divide by 2**encoder_depth (a ValueError otherwise, as smp raises)."""

    min_depth = 2

    @nn.compact
    def __call__(self, features: dict, train: bool = False, size=None):
        feats = self.decoder_features(features)
        check_divisible(self, feats, size)
        x = self.unet_decoder(UnetPlusPlusDecoder, train)(feats)
        return self.smp_segmentation_head(3)(x)


RULES = (*UnetDecoderBlock.torch_rules(r"decoder\.blocks\.(x_\d+_\d+)",
                                       r"head/decoder/blocks_\1"),
         *center_rules(), *SmpSegmentationHead.torch_rules())
