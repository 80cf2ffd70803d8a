"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import (alexnet, convnext, googlenet, mobilenet_v1, mobilenet_v2, mobilenet_v3,
                                 resnet, vgg, xception, xception_aligned)

__all__ = ["alexnet", "convnext", "googlenet", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3", "resnet",
           "vgg", "xception", "xception_aligned"]
