"""Helpers for the smp decoder parity tests: smp's decoder + segmentation head as one torch
module, its random weights, and the head's variables, outputs and statistics against it."""
import functools

import jax
import numpy as np
import torch

from flaxbones.weights import convert_state_dict
from torch_ref import assert_close, randomize


class Reference(torch.nn.Module):
    """smp's decoder and segmentation head, keyed as in an smp model's state dict."""

    def __init__(self, decoder, segmentation_head):
        super().__init__()
        self.decoder, self.segmentation_head = decoder, segmentation_head

    def forward(self, features):
        return self.segmentation_head(self.decoder(features))


def fill(model, seed):
    """Random weights (kernels of variance 1 / fan-in, biases N(0, 0.1^2)), then BN's
    affines and statistics made non-trivial; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.1 if p.ndim == 1 else float(np.prod(p.shape[1:])) ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return randomize(model, seed).eval()


def torch_outputs(ref, features):
    """`ref` on smp's NHWC feature list (as NCHW tensors), its output as NHWC numpy."""
    with torch.no_grad():
        out = ref([torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))
                   for f in features])
    return out.numpy().transpose(0, 2, 3, 1)


def convert(state, target, rules):
    """A head's variables from an smp state dict: the rules map onto `head/...`."""
    wrapped = {collection: {"head": value} for collection, value in target.items()}
    variables, _ = convert_state_dict(state, wrapped, rules)
    return {collection: value["head"] for collection, value in variables.items()}


def load_head(ref, head, features, rules, **kwargs):
    """(`ref`'s weights as `head`'s variables, the head's inputs): smp's NHWC features[1:]
    as C1.., empty levels left out. `kwargs` are static init arguments (`size`)."""
    levels = {f"C{k}": f for k, f in enumerate(features) if k and f.shape[-1]}
    init = functools.partial(head.init, **kwargs)
    return convert(ref.state_dict(), jax.eval_shape(init, jax.random.PRNGKey(0), levels),
                   rules), levels


def param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def assert_parity(out, ref, features, variables, what: str) -> float:
    """The head's output `out` equals `ref`'s on `features`, and so do parameter counts."""
    rel = assert_close(out, torch_outputs(ref, features), what=what)
    assert param_count(variables) == sum(p.numel() for p in ref.parameters())
    return rel


def assert_train_parity(ref, head, variables, features, levels, rules, what: str):
    """Train mode (`ref` in it): outputs and every updated BatchNorm statistic."""
    out, updates = jax.jit(lambda v, f: head.apply(v, f, train=True, mutable=["batch_stats"]))(
        variables, levels)
    assert_close(out, torch_outputs(ref, features), what=f"{what} train")
    stats = convert(ref.state_dict(), variables, rules)["batch_stats"]
    flat, want = jax.tree.leaves_with_path(updates["batch_stats"]), dict(
        jax.tree.leaves_with_path(stats))
    assert len(flat) == len(want) > 0
    for path, value in flat:
        assert_close(value, want[path], what=f"{what} {jax.tree_util.keystr(path)}")
