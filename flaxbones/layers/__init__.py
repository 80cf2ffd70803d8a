"""Small shared blocks: conv-norm-act, PyTorch-exact BatchNorm, padding, pooling, resizing."""
from flaxbones.layers.conv import Activated, ConvNormAct, ModuleDef
from flaxbones.layers.cpu_conv import Conv, conv_general_dilated, loop_conv, make_conv
from flaxbones.layers.init import kaiming_fan_out, normal_001, torch_bias_init, torch_default_init
from flaxbones.layers.inverted_residual import InvertedResidual, make_divisible
from flaxbones.layers.module import ConvNormModule, option
from flaxbones.layers.norm import BatchNorm
from flaxbones.layers.padding import conv_padding, torch_padding
from flaxbones.layers.pooling import adaptive_avg_pool, global_avg_pool, max_pool
from flaxbones.layers.resize import resize_bilinear, resize_nearest
from flaxbones.layers.separable import SeparableConv
from flaxbones.layers.squeeze_excite import SqueezeExcite

__all__ = ["Activated", "BatchNorm", "Conv", "ConvNormAct", "ConvNormModule", "InvertedResidual",
           "ModuleDef", "SeparableConv", "SqueezeExcite", "adaptive_avg_pool",
           "conv_general_dilated", "conv_padding", "global_avg_pool", "kaiming_fan_out", "loop_conv",
           "make_conv", "make_divisible", "max_pool", "normal_001", "option", "resize_bilinear",
           "resize_nearest", "torch_bias_init", "torch_default_init", "torch_padding"]
