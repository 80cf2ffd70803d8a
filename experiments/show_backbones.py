"""Build every registered backbone and print its feature table (offline, no weights).

    python experiments/show_backbones.py [--output-stride 16] [--pattern 'resnet*']
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import flaxbones as fb


def describe(name: str, output_stride: int, size: int):
    """(parameter count, feature table row) of one backbone, shapes checked via eval_shape."""
    backbone = fb.create_backbone(name, output_stride=output_stride)
    images = jnp.zeros((1, size, size, 3))
    feats, variables = jax.eval_shape(lambda: backbone.init_with_output(jax.random.PRNGKey(0), images))
    params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    cells = []
    for info in backbone.feature_info:
        h, w = feats[info.name].shape[1:3]
        assert feats[info.name].shape[-1] == info.channels
        cells.append(f"{info.name} /{info.stride} x{info.channels} ({h}x{w})")
    return params, cells


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-stride", type=int, default=32)
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"| backbone | params | features at {args.size}x{args.size}, output_stride {args.output_stride} |")
    print("|---|---:|---|")
    for name in fb.list_backbones(args.pattern):
        try:
            params, cells = describe(name, args.output_stride, args.size)
        except ValueError as e:
            print(f"| {name} | | {e} |")
            continue
        print(f"| {name} | {params / 1e6:.2f}M | {' · '.join(cells)} |")

    name = "resnet18"
    model = fb.create_model(name, num_classes=10)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 97, 131, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    logits = jax.jit(model.apply)(variables, images)["out"]
    print(f"\n{name} classifier on 2x97x131x3 images -> logits {logits.shape}, "
          f"finite: {bool(jnp.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
