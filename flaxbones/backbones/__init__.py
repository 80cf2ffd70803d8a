"""Backbone families; importing this module registers every one of them."""
from flaxbones.backbones import (alexnet, convnext, densenet, efficientnet, googlenet,
                                 inception_v3, maxvit, mnasnet, mobilenet_v1, mobilenet_v2,
                                 mobilenet_v3, regnet, resnet, shufflenet, squeezenet, swin, vgg,
                                 vit, xception, xception_aligned)

__all__ = ["alexnet", "convnext", "densenet", "efficientnet", "googlenet", "inception_v3",
           "maxvit", "mnasnet", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3", "regnet", "resnet",
           "shufflenet", "squeezenet", "swin", "vgg", "vit", "xception", "xception_aligned"]
