"""Reading state dicts from files, safely: safetensors without torch, .pth weights-only;
and the metadata that flaxbones writes into its own safetensors files."""
import hashlib
import json
import pathlib

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "state_dict_ema")
# Metadata keys of a file `save_weights` wrote: the layout ('flax' or 'torch') marks it.
LAYOUT, DIGEST = "flaxbones_layout", "flaxbones_sha256"


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A flat {key: numpy array} from a `.safetensors` or torch `.pth/.pt/.bin` file.

    Torch files are read with `torch.load(weights_only=True)`, so a file can never run
    code; a checkpoint that wraps its state dict ({'state_dict': ...}, DDP 'module.'
    prefixes) is unwrapped.
    """
    return read_weight_file(path)[0]


def read_weight_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, safetensors metadata ({} for torch files)). A file flaxbones wrote is
    checked against the digest of its tensors, so altered bytes are an error too."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path), {}
    raise ValueError(f"unknown weight file format {path.suffix!r} for {path}; expected "
                     f".safetensors or one of {TORCH_SUFFIXES}")


def _read_safetensors(path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if DIGEST in metadata and file_digest(state, metadata) != metadata[DIGEST]:
        raise ValueError(f"{path} was altered after flaxbones wrote it: its tensors or "
                         "metadata do not match the digest it was saved with")
    return state, metadata


def file_digest(state: dict, metadata: dict) -> str:
    """SHA-256 over `state`'s names, dtypes, shapes and bytes (in key order) and the other
    metadata entries: what `save_weights` stores under DIGEST."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST},
                                       sort_keys=True).encode())
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        digest.update(json.dumps([key, value.dtype.name, value.shape]).encode())
        digest.update(value.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def encode_kwargs(kwargs: dict) -> str:
    """JSON of create_model keywords: dtypes by name, tuples as lists."""
    def encode(value):
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [encode(v) for v in value]
        if isinstance(value, (np.dtype, type)):
            import jax.numpy as jnp
            try:
                return {"__dtype__": jnp.dtype(value).name}
            except TypeError:
                pass
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        raise ValueError(f"model_kwargs value {value!r} ({type(value).__name__}) cannot be "
                         "saved: use names, numbers, strings, dtypes, tuples and dicts")
    return json.dumps(encode(dict(kwargs)), sort_keys=True)


def decode_kwargs(text: str) -> dict:
    """`encode_kwargs` undone: dtypes as jnp dtypes, lists as tuples."""
    import jax.numpy as jnp

    def decode(value):
        if isinstance(value, dict):
            if value.keys() == {"__dtype__"}:
                name = value["__dtype__"]
                return getattr(jnp, name) if hasattr(jnp, name) else jnp.dtype(name)
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(decode(v) for v in value)
        return value
    kwargs = decode(json.loads(text))
    if not isinstance(kwargs, dict):
        raise ValueError(f"model_kwargs must be a JSON object, got {text[:80]!r}")
    return kwargs


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
