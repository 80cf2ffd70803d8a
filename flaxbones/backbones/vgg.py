"""VGG 11/13/16/19, with and without BatchNorm (torchvision layout), dilated as DeepLab v1."""
from functools import partial
from typing import Sequence

from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.layers import ConvNormAct
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# Conv widths of the five stages; each stage ends in a 2x2 max-pool (torchvision's cfgs A/B/D/E).
STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(Backbone):
    """VGG backbone. C1..C4 are the last ReLU of stages 2..5 (strides 2..16, before pool2..5:
    the deepest activation at each stride, as timm, SSD and U-Net tap it); C5 is pool5.

    `output_stride` 16/8 as DeepLab v1: a pool past the output stride becomes a 3x3,
    stride 1, pad 1 max-pool (DeepLab-LargeFOV) and every conv after it is dilated by
    the stride removed so far (OS16: pool5 only, no conv follows; OS8: pool4 and pool5,
    conv5_* dilation 2). At OS32 the network is torchvision's exactly.
    """

    stages: Sequence[Sequence[int]]
    batch_norm: bool = False

    def _plans(self):  # pool1..pool5
        return plan_output_stride((2,) * 5, self.output_stride)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        stride, strides = 1, []
        for plan in self._plans():
            strides.append(stride := stride * plan.stride)
        infos = [FeatureInfo(f"C{k}", strides[k - 1], self.stages[k][-1]) for k in range(1, 5)]
        infos.append(FeatureInfo("C5", strides[4], self.stages[4][-1]))
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=self.output_stride)
        info = self.feature_info
        conv = self.conv_def(use_bias=True)
        norm = self.norm_def(train) if self.batch_norm else None
        pool, unit = self.pool_def(), self.block_def(ConvNormAct)
        feats, dilation = {}, 1
        for s, (widths, plan) in enumerate(zip(self.stages, self._plans())):
            for j, width in enumerate(widths):
                x = unit(width, 3, dilation=dilation, conv=conv, norm=norm,
                         name=f"conv{s + 1}_{j + 1}")(x)
            if s > 0:
                feats[f"C{s}"] = x
            x = pool(x, 2, 2) if plan.stride == 2 else pool(x, 3, 1, padding=1)
            dilation = plan.dilation
        feats["C5"] = x
        return {f.name: feats[f.name] for f in info}


def torchvision_vgg_source(stages, batch_norm: bool) -> WeightSource:
    """torchvision's keys: `features.N` counts conv, [bn,] relu and pool modules in order."""
    rules, index = [], 0
    for s, widths in enumerate(stages):
        for j in range(len(widths)):
            module = f"backbone/conv{s + 1}_{j + 1}"
            rules.append((rf"features\.{index}", f"{module}/conv"))
            if batch_norm:
                rules.append((rf"features\.{index + 1}", f"{module}/bn"))
            index += 3 if batch_norm else 2
        index += 1
    return WeightSource("torchvision", rules=tuple(rules), **TORCH_IMAGENET)


for _depth, _stages in STAGES.items():  # vgg11 ... vgg19_bn, each with its own key map
    for _bn in (False, True):
        _name = f"vgg{_depth}{'_bn' if _bn else ''}"
        register_variants("vgg", weights=torchvision_vgg_source(_stages, _bn),
                          variants={_name: partial(VGG, stages=_stages, batch_norm=_bn)})
