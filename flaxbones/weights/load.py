"""`load_pretrained`: a model name and a weight file in, variables out."""
import os
import pathlib
from typing import Any
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxbones.registry import create_model, get_spec
from flaxbones.weights.convert import LoadReport, _listing, convert_state_dict
from flaxbones.weights.io import LAYOUT, decode_kwargs, read_weight_file


def load_pretrained(name: str | None, path: str | os.PathLike, *, skip_head: bool = False,
                    rng: jax.Array | None = None, return_report: bool = False,
                    **create_kwargs: Any) -> dict | tuple[dict, LoadReport]:
    """Variables ({'params', 'batch_stats'}) for `create_model(name, **create_kwargs)`.

    `path` is a weight file (.safetensors, .pth, ...) or an Orbax training checkpoint
    directory (`flaxbones.train.checkpoint.load_variables`, which rebuilds the model from
    the saved metadata unless kwargs are given; `name=None` takes the saved name too).
    A file `fb.save_weights` wrote names its model: `name=None` takes it and its kwargs
    (`create_kwargs` override them), a different `name` is an error. Its flax layout is
    checked leaf by leaf (paths, shapes, dtypes) and loads bit for bit; a `scan_blocks`
    other than the saved one stacks or unstacks the blocks; `param_dtype` casts.
    Other files (torchvision / timm state dicts) are converted by the name's registered
    weight source. A segmentation_models_pytorch state dict loads as `name="smp:Unet"`
    (or "smp_unet") with smp's arguments, `encoder_name="resnet34", classes=3`
    (`flaxbones.smp.load_pretrained`). With `scan_blocks=True` a torch file is loaded
    onto the unscanned model, then stacked (`flaxbones.scan.scan_variables`); a
    checkpoint loads in the form it was saved in.

    Loading is all or nothing: every leaf must come from the file, shapes must agree, and
    every key in the file must be used.

    Args:
        name: The registered model name the weights belong to; None takes the name saved
            in a file `save_weights` wrote, or in a checkpoint.
        path: A weight file (`.safetensors`, `.pth`, `.pt`, `.bin`, `.ckpt`) or a
            checkpoint directory (`flaxbones.train.checkpoint.Checkpoints`).
        skip_head: Let the head (and aux head) differ, e.g. another `num_classes`: those
            leaves keep their initial values.
        rng: The PRNG key that initialises skipped leaves (default `PRNGKey(0)`).
        return_report: Also return the `LoadReport` (loaded, skipped, ignored keys).
        **create_kwargs: `create_model` options of the target model (`num_classes`,
            `dtype`, `param_dtype`, `scan_blocks`, ...).

    Returns:
        The variable dict, as numpy-backed `jax.Array`s; with `return_report`,
            `(variables, LoadReport)`.

    Raises:
        ValueError: The file does not fit the model (missing, unexpected or mis-shaped
            keys, listed), names another model, lacks a name when `name` is None, has an
            unknown format, or the model has no weight source.
        FileNotFoundError: `path` does not exist.
        flaxbones.train.checkpoint.CheckpointError: A checkpoint step cannot be
            restored.
    """
    if pathlib.Path(path).is_dir():
        from flaxbones.train.checkpoint import load_variables
        out = load_variables(path, name, skip_head=skip_head, rng=rng, **create_kwargs)
        return out if return_report else out[0]
    state, metadata = read_weight_file(path)
    layout, saved = metadata.get(LAYOUT), {}
    if layout not in (None, "flax", "torch"):
        raise ValueError(f"{path} has an unknown {LAYOUT} {layout!r} (expected 'flax' or "
                         "'torch')")
    if layout is not None:
        name, saved = _saved_model(path, name, metadata)
    elif name is None:
        raise ValueError(f"{path} is a weight file: pass the model name it belongs to")
    elif name.startswith(("smp:", "smp_")):
        from flaxbones import smp
        return smp.load_pretrained(name.removeprefix("smp:"), path, skip_head=skip_head,
                                   rng=rng, return_report=return_report, **create_kwargs)
    if layout == "flax":
        out = _from_flax_layout(name, state, saved, create_kwargs, skip_head, rng)
    else:
        out = _from_torch_layout(name, state, {**saved, **create_kwargs}, skip_head, rng)
    return out if return_report else out[0]


def _saved_model(path, name, metadata) -> tuple[str, dict]:
    """(name, saved create kwargs) of a file save_weights wrote, checked against `name`."""
    saved_name = metadata.get("model")
    if name is not None and saved_name is not None and name != saved_name:
        raise ValueError(f"{path} holds weights of {saved_name!r}, not {name!r}")
    if name is None and saved_name is None:
        raise ValueError(f"{path} was saved without a model name: pass the model name")
    try:
        saved = decode_kwargs(metadata.get("model_kwargs", "{}"))
    except ValueError as e:  # json's errors are ValueErrors too
        raise ValueError(f"{path} has unreadable model_kwargs metadata: {e}") from e
    return name or saved_name, saved


def _init(name: str, kwargs: dict, rng=None):
    """(init function, rngs, images) for `create_model(name, **kwargs)` in eval mode."""
    model = create_model(name, **kwargs)
    source = get_spec(name).weights
    size = source.input_size if source is not None else 224
    images = jnp.zeros((1, size, size, 3), kwargs.get("dtype", jnp.float32))
    rngs = {"params": jax.random.PRNGKey(0) if rng is None else rng}
    return partial(model.init, train=False), rngs, images


def abstract_variables(name: str, kwargs: dict) -> dict:
    """The variables' shapes and dtypes of `create_model(name, **kwargs)` (`eval_shape`)."""
    init, rngs, images = _init(name, kwargs)
    return jax.eval_shape(init, rngs, images)


def _fresh(name, kwargs, rng, keys):
    """Freshly initialised leaves `keys` ('params/head/...'): only they leave the jitted init,
    so XLA drops the forward pass and every other initialiser before compiling."""
    init, rngs, images = _init(name, kwargs, rng)

    def init_keys(rngs, images):
        fresh = traverse_util.flatten_dict(init(rngs, images), sep="/")
        return {k: fresh[k] for k in keys}

    return jax.jit(init_keys)(rngs, images)


def check_variables(flat: dict, target: dict, what: str, consequence: str = "nothing was loaded",
                    skip_prefixes=(), cast: bool = False) -> tuple[list, list]:
    """Check `flat` ('params/...' -> array) against `target` (`abstract_variables`): the
    same paths, shapes and (unless `cast`) dtypes, else a ValueError listing the first
    offenders. Leaves under `skip_prefixes` ('head/') may differ or be absent: returns
    (target leaves to initialise afresh, `flat` leaves to ignore)."""
    want = traverse_util.flatten_dict(target, sep="/")
    missing = [k for k in want if k not in flat]
    unexpected = [k for k in flat if k not in want]
    mismatched = [k for k in flat if k in want and (
        np.shape(flat[k]) != want[k].shape
        or (not cast and np.dtype(flat[k].dtype) != np.dtype(want[k].dtype)))]

    def skippable(key):
        return key.split("/", 1)[-1].startswith(tuple(skip_prefixes))
    skipped = sorted(k for k in missing + mismatched if skippable(k))
    ignored = sorted(k for k in unexpected + mismatched if skippable(k))
    missing, unexpected, mismatched = ([k for k in keys if not skippable(k)]
                                       for keys in (missing, unexpected, mismatched))
    if missing or unexpected or mismatched:
        described = [f"{k} {np.shape(flat[k])} {np.dtype(flat[k].dtype).name} -> model "
                     f"{want[k].shape} {np.dtype(want[k].dtype).name}" for k in mismatched]
        raise ValueError(f"{what} do not match the model; {consequence}.\n" + "\n".join(
            _listing(title, items) for title, items in (
                ("missing", missing), ("unexpected", unexpected),
                ("shape or dtype mismatch", described)) if items))
    return skipped, ignored


def _from_flax_layout(name, state, saved, given, skip_head, rng):
    kwargs = {**saved, **given}
    form = dict(kwargs)  # the model as saved: scanned or not
    if bool(kwargs.get("scan_blocks")) != bool(saved.get("scan_blocks")):
        form.pop("scan_blocks")
        form.update({"scan_blocks": True} if saved.get("scan_blocks") else {})
    source = get_spec(name).weights
    heads = source.head_prefixes() if source is not None else ("head/", "aux_head/")
    target = abstract_variables(name, form)
    skipped, ignored = check_variables(
        state, target, f"the file's variables (for {name!r}, kwargs {kwargs})",
        skip_prefixes=heads if skip_head else (), cast="param_dtype" in given)
    dtypes = {k: x.dtype for k, x in traverse_util.flatten_dict(target, sep="/").items()}
    flat = {k: jnp.asarray(v, dtypes[k]) for k, v in state.items() if k not in ignored}
    if skipped:
        flat.update(_fresh(name, form, rng, skipped))
    variables = traverse_util.unflatten_dict(flat, sep="/")
    if form != kwargs:
        from flaxbones.scan import scan_variables, unscan_variables
        variables = (unscan_variables(variables, create_model(name, **form)) if
                     form.get("scan_blocks") else
                     scan_variables(variables, create_model(name, **kwargs)))
    loaded = sorted(k for k in flat if k not in skipped)
    return variables, LoadReport(loaded=loaded, skipped=skipped, ignored_keys=ignored)


def _from_torch_layout(name, state, create_kwargs, skip_head, rng):
    if create_kwargs.get("scan_blocks"):
        from flaxbones.scan import scan_variables

        variables, report = _from_torch_layout(name, state, {**create_kwargs, "scan_blocks": False},
                                               skip_head, rng)
        return scan_variables(variables, create_model(name, **create_kwargs)), report
    source = get_spec(name).weights
    if source is None:
        raise ValueError(f"{name!r} has no registered weight source to load files from")
    init, rngs, images = _init(name, create_kwargs, rng)
    target = jax.eval_shape(init, rngs, images)
    skip = source.head_prefixes() if skip_head else ()
    variables, report = convert_state_dict(state, target, source.rules, skip)
    if report.skipped:
        flat = traverse_util.flatten_dict(variables, sep="/")
        flat.update(_fresh(name, create_kwargs, rng, report.skipped))
        variables = traverse_util.unflatten_dict(flat, sep="/")
    return variables, report
