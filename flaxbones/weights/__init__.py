"""Weight files: import from PyTorch/timm/torchvision files, export to safetensors."""
from flaxbones.weights.convert import LoadReport, convert_state_dict
from flaxbones.weights.io import read_state_dict
from flaxbones.weights.load import load_pretrained
from flaxbones.weights.reference import torch_reference, torch_state_dict
from flaxbones.weights.save import save_weights
from flaxbones.weights.source import IMAGENET_MEAN, IMAGENET_STD, WeightSource

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadReport", "WeightSource", "convert_state_dict",
           "load_pretrained", "read_state_dict", "save_weights", "torch_reference",
           "torch_state_dict"]
