"""What every segmentation head shares: its fields, its conv/norm factories, its needs."""
from functools import partial

from flax import linen as nn

from flaxbones.layers import ConvNormModule, torch_default_init


class SegmentationHead(ConvNormModule):
    """Base of the segmentation heads: `head(features, train)` -> logits (NHWC) at the
    resolution of its finest input level; the Segmenter resizes them to the image.

    `levels` names the feature levels a head reads, so a Segmenter checks a backbone
    before init; `align_corners` is the reference's final-upsampling rule. BatchNorm
    epsilon and (Flax) momentum come from the reference the head mirrors.
    """

    num_classes: int

    conv_init = staticmethod(torch_default_init)
    align_corners = False
    supported_strides = None  # a tuple of strides of its deepest input, or None: any

    @property
    def levels(self) -> tuple[str, ...]:
        raise NotImplementedError

    @nn.nowrap
    def classifier_def(self, **kwargs):
        """The final 1x1 conv (with bias) to `num_classes`."""
        return partial(self.conv_def(use_bias=True), self.num_classes,
                       **{"kernel_size": (1, 1), **kwargs})
