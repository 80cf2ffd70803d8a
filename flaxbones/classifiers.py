"""Classifier presets: which head each backbone's reference classifier has, and where that
reference's weight files keep the head (so `create_model(name)` loads `name`'s files).

Backbones know no heads; this table is where a family meets its classifier.
"""
import dataclasses
from functools import partial
from typing import Callable

from flax import linen as nn

from flaxbones.heads.classification import (ClassifierHead, FCHead, GoogLeNetAux,
                                            InceptionV3Aux, LayerNormHead, MaxVitHead,
                                            MobileNetV3Head, SqueezeNetHead)
from flaxbones.layers import normal_001
from flaxbones.layers.module import ConvNormModule
from flaxbones.models import Classifier
from flaxbones.registry import register_classifier

# What a head shares with the backbone under it, so its BatchNorm matches the backbone's.
_SHARED = ("bn_epsilon", "bn_momentum", "axis_name", "dtype", "param_dtype", "cpu_kernels")


@dataclasses.dataclass(frozen=True)
class ClassifierPreset:
    """`head(num_classes=, drop_rate=, dtype=, param_dtype=)` builds the head; `aux`, when
    set, the auxiliary head (on by default, `aux_logits=False` drops it); `rules` map the
    reference file's head keys onto `head/...` and `aux_head/...`."""

    head: Callable = ClassifierHead
    rules: tuple = ()
    aux: Callable | None = None

    def build(self, backbone_builder, num_classes: int, *, drop_rate: float = 0.0,
              aux_logits: bool | None = None, aux_drop_rate: float | None = None,
              **backbone_kwargs) -> Classifier:
        """backbone + head (+ aux head). The backbone also returns the levels the heads read
        beyond its defaults, unless `out_features` is given."""
        if self.aux is None and (aux_logits or aux_drop_rate is not None):
            raise ValueError("this classifier has no auxiliary head: aux_logits and "
                             "aux_drop_rate do not apply")
        if aux_logits and num_classes == 0:
            raise ValueError("auxiliary classifiers need num_classes >= 1")
        with_aux = self.aux is not None and (num_classes > 0 if aux_logits is None else aux_logits)
        dtypes = {k: backbone_kwargs[k] for k in ("dtype", "param_dtype") if k in backbone_kwargs}
        head = self.head(num_classes=num_classes, drop_rate=drop_rate, **dtypes)
        aux = None
        if with_aux:
            rate = aux_drop_rate if aux_drop_rate is not None else 0.7 if drop_rate > 0 else 0.0
            aux = partial(self.aux, num_classes=num_classes, drop_rate=rate)
        backbone = backbone_builder(**backbone_kwargs)
        wanted = (*head.levels, *(aux().levels if aux else ()))
        names = [f.name for f in backbone.feature_info]
        extra = tuple(level for level in wanted if level not in names)
        if extra and "out_features" not in backbone_kwargs:
            backbone = backbone_builder(**backbone_kwargs, out_features=(*names, *extra))
        shared = {k: getattr(backbone, k) for k in _SHARED if hasattr(backbone, k)}
        if isinstance(head, ConvNormModule):  # a conv head (SqueezeNet's) builds as the backbone
            head = head.clone(**shared)
        return Classifier(backbone, head, aux(**shared) if aux else None)


def _fc(torch_name: str) -> ClassifierPreset:
    """The default head (pool, dropout, `fc`), kept at `torch_name` in the reference file."""
    return ClassifierPreset(rules=ClassifierHead.torch_rules(torch_name))


# torchvision's classifiers drop before `fc` in training (MobileNets p=0.2, GoogLeNet 0.2,
# VGG/AlexNet 0.5): pass drop_rate to match; create_model's default is 0.
register_classifier(("resnet*", "resnext*", "wide_resnet*", "xception"), _fc("fc"))
register_classifier(("xception65", "xception71"), _fc(r"head\.fc"))
register_classifier(("mobilenet_v1",), _fc("classifier"))
register_classifier(("mobilenet_v2*",), _fc(r"classifier\.1"))
register_classifier(("mobilenet_v3_large",), ClassifierPreset(
    partial(MobileNetV3Head, hidden_channels=1280), MobileNetV3Head.torch_rules()))
register_classifier(("mobilenet_v3_small",), ClassifierPreset(
    partial(MobileNetV3Head, hidden_channels=1024), MobileNetV3Head.torch_rules()))
register_classifier(("vgg*",), ClassifierPreset(
    partial(FCHead, pool_size=7, kernel_init=normal_001, zero_bias=True), FCHead.torch_rules()))
register_classifier(("alexnet",), ClassifierPreset(
    partial(FCHead, pool_size=6, drop_before_fc=True), FCHead.torch_rules(drop_before_fc=True)))
register_classifier(("googlenet",), ClassifierPreset(
    partial(ClassifierHead, kernel_init=normal_001),
    ClassifierHead.torch_rules("fc") + GoogLeNetAux.torch_rules(), GoogLeNetAux))
register_classifier(("convnext_*",),
                    ClassifierPreset(LayerNormHead, LayerNormHead.torch_rules()))
register_classifier(("convnextv2_*",), ClassifierPreset(
    LayerNormHead, LayerNormHead.torch_rules(r"head\.norm", r"head\.fc")))
register_classifier(("regnet_*",), ClassifierPreset(
    partial(ClassifierHead, kernel_init=normal_001), ClassifierHead.torch_rules("fc")))
register_classifier(("swin_*",), ClassifierPreset(
    partial(LayerNormHead, norm_first=True, epsilon=1e-5),
    LayerNormHead.torch_rules("norm", "head")))
register_classifier(("densenet*",), _fc("classifier"))
register_classifier(("maxvit_*",), ClassifierPreset(MaxVitHead, MaxVitHead.torch_rules()))
register_classifier(("shufflenet_v2_*",), _fc("fc"))
register_classifier(("inception_v3",), ClassifierPreset(
    partial(ClassifierHead, kernel_init=nn.initializers.normal(0.1)),
    ClassifierHead.torch_rules("fc") + InceptionV3Aux.torch_rules(), InceptionV3Aux))
register_classifier(("squeezenet*",),
                    ClassifierPreset(SqueezeNetHead, SqueezeNetHead.torch_rules()))
# ViTs classify the final-normed class token (torchvision's head weights start at zero).
_VIT_HEAD = partial(ClassifierHead, feature="class_token", kernel_init=nn.initializers.zeros)
register_classifier(("vit_b_*", "vit_l_*", "vit_h_*"), ClassifierPreset(
    _VIT_HEAD, ClassifierHead.torch_rules(r"heads\.head")))
register_classifier(("vit_*_patch*",), ClassifierPreset(
    _VIT_HEAD, ClassifierHead.torch_rules("head")))
# torchvision's EfficientNet / MNASNet: dropout + Linear `classifier.1` (their Linear inits)
register_classifier(("efficientnet_*",), ClassifierPreset(partial(
    ClassifierHead, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")),
    ClassifierHead.torch_rules(r"classifier\.1")))
register_classifier(("mnasnet*",), ClassifierPreset(partial(
    ClassifierHead, kernel_init=nn.initializers.variance_scaling(1.0, "fan_out", "uniform")),
    ClassifierHead.torch_rules(r"classifier\.1")))
