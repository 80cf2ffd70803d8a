"""`load_pretrained`: a model name and a weight file in, variables out."""
import pathlib
from functools import partial

import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxbones.registry import create_model, get_spec
from flaxbones.weights.convert import convert_state_dict
from flaxbones.weights.io import read_state_dict


def load_pretrained(name: str | None, path, *, skip_head: bool = False, rng=None,
                    return_report: bool = False, **create_kwargs):
    """Variables ({'params', 'batch_stats'}) for `create_model(name, **create_kwargs)`.

    `path` is a weight file (.safetensors, .pth, ...) or an Orbax training checkpoint
    directory (`flaxbones.train.checkpoint.load_variables`, which rebuilds the model from
    the saved metadata unless kwargs are given; `name=None` takes the saved name too).

    Every leaf must come from the file, shapes must agree, and every key in the file must
    be used: anything else raises a ValueError listing the first offenders, and nothing is
    returned. With `skip_head=True` the head (and aux head) may differ, e.g. another
    num_classes: those leaves keep their initial values (from `rng`) and the report
    (`return_report=True`: (variables, LoadReport)) says which.
    With `scan_blocks=True` a weight file is loaded onto the unscanned model, then stacked
    (`flaxbones.scan.scan_variables`); a checkpoint loads in the form it was saved in.
    """
    if pathlib.Path(path).is_dir():
        from flaxbones.train.checkpoint import load_variables
        out = load_variables(path, name, skip_head=skip_head, rng=rng, **create_kwargs)
        return out if return_report else out[0]
    if name is None:
        raise ValueError(f"{path} is a weight file: pass the model name it belongs to")
    if create_kwargs.get("scan_blocks"):
        from flaxbones.scan import scan_variables

        variables, report = load_pretrained(name, path, skip_head=skip_head, rng=rng,
                                            return_report=True,
                                            **{**create_kwargs, "scan_blocks": False})
        variables = scan_variables(variables, create_model(name, **create_kwargs))
        return (variables, report) if return_report else variables
    model = create_model(name, **create_kwargs)
    source = get_spec(name).weights
    if source is None:
        raise ValueError(f"{name!r} has no registered weight source to load files from")
    state = read_state_dict(path)
    size = source.input_size
    images = jnp.zeros((1, size, size, 3), create_kwargs.get("dtype", jnp.float32))
    init = partial(model.init, train=False)
    rngs = {"params": jax.random.PRNGKey(0) if rng is None else rng}
    target = jax.eval_shape(init, rngs, images)
    skip = source.head_prefixes() if skip_head else ()
    variables, report = convert_state_dict(state, target, source.rules, skip)
    if report.skipped:
        fresh = traverse_util.flatten_dict(jax.jit(init)(rngs, images), sep="/")
        flat = traverse_util.flatten_dict(variables, sep="/")
        flat.update({k: fresh[k] for k in report.skipped})
        variables = traverse_util.unflatten_dict(flat, sep="/")
    return (variables, report) if return_report else variables
