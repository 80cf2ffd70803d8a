"""Composition: a backbone and a head make a model."""
from flax import linen as nn


class Classifier(nn.Module):
    """Backbone features -> classification head. Variables live under `backbone` and
    `head`, so a classifier's backbone sub-tree drops into any other model's."""

    backbone: nn.Module
    head: nn.Module

    @property
    def feature_info(self):
        return self.backbone.feature_info

    def __call__(self, x, train: bool = False):
        return self.head(self.backbone(x, train=train), train=train)
