"""Weight import from PyTorch/timm/torchvision files."""
from flaxbones.weights.convert import LoadReport, convert_state_dict
from flaxbones.weights.io import read_state_dict
from flaxbones.weights.load import load_pretrained
from flaxbones.weights.source import IMAGENET_MEAN, IMAGENET_STD, WeightSource

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadReport", "WeightSource", "convert_state_dict",
           "load_pretrained", "read_state_dict"]
