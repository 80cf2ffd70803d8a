"""Small shared blocks: conv-norm-act, PyTorch-exact BatchNorm, padding and pooling."""
from flaxbones.layers.conv import ConvNormAct, ModuleDef, kaiming_fan_out
from flaxbones.layers.norm import BatchNorm
from flaxbones.layers.padding import conv_padding, torch_padding
from flaxbones.layers.pooling import adaptive_avg_pool, global_avg_pool, max_pool

__all__ = ["BatchNorm", "ConvNormAct", "ModuleDef", "adaptive_avg_pool", "conv_padding",
           "global_avg_pool", "kaiming_fan_out", "max_pool", "torch_padding"]
