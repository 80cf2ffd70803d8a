"""Reading state dicts from files, safely: safetensors without torch, .pth weights-only."""
import pathlib

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "state_dict_ema")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A flat {key: numpy array} from a `.safetensors` or torch `.pth/.pt/.bin` file.

    Torch files are read with `torch.load(weights_only=True)`, so a file can never run
    code; a checkpoint that wraps its state dict ({'state_dict': ...}, DDP 'module.'
    prefixes) is unwrapped.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(f"unknown weight file format {path.suffix!r} for {path}; expected "
                     f".safetensors or one of {TORCH_SUFFIXES}")


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _read_torch(path):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install 'flaxbones[torch]'), "
                          "or convert it to .safetensors") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise ValueError(f"{path} could not be read as a weights-only torch file: {e}") from e
    while isinstance(obj, dict):
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if not wrapped or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[wrapped[0]]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key.removeprefix("module.")
        if value.dtype == torch.bfloat16:
            value = value.float()
        state[key] = value.detach().cpu().numpy()
    return state
