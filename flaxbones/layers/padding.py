"""Padding rules: explicit PyTorch-style symmetric padding and TF 'SAME'."""


def torch_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple:
    """Symmetric per-side padding PyTorch models use: dilation * (k - 1) // 2."""
    del stride  # PyTorch models pad independently of stride
    pad = dilation * (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))


def conv_padding(kernel_size: int, stride: int = 1, dilation: int = 1, mode: str = "torch"):
    """Padding argument for `nn.Conv`: 'torch' (symmetric) or 'same' (TF, asymmetric)."""
    if mode == "torch":
        return torch_padding(kernel_size, stride, dilation)
    if mode == "same":
        return "SAME"
    raise ValueError(f"unknown padding mode {mode!r}; expected 'torch' or 'same'")
