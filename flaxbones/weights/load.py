"""`load_pretrained`: a model name and a weight file in, variables out."""
from functools import partial

import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxbones.registry import create_model, get_spec
from flaxbones.weights.convert import convert_state_dict
from flaxbones.weights.io import read_state_dict


def load_pretrained(name: str, path, *, skip_head: bool = False, rng=None,
                    return_report: bool = False, **create_kwargs):
    """Variables ({'params', 'batch_stats'}) for `create_model(name, **create_kwargs)`.

    Every leaf must come from the file, shapes must agree, and every key in the file must
    be used: anything else raises a ValueError listing the first offenders, and nothing is
    returned. With `skip_head=True` the classifier head may differ (another num_classes):
    its leaves keep their initial values (from `rng`) and the report says which.
    """
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
    prefixes = source.head_prefix
    skip = ((prefixes,) if isinstance(prefixes, str) else tuple(prefixes)) if skip_head else ()
    variables, report = convert_state_dict(state, target, source.rules, skip)
    if report.skipped:
        fresh = traverse_util.flatten_dict(jax.jit(init)(rngs, images), sep="/")
        flat = traverse_util.flatten_dict(variables, sep="/")
        flat.update({k: fresh[k] for k in report.skipped})
        variables = traverse_util.unflatten_dict(flat, sep="/")
    return (variables, report) if return_report else variables
