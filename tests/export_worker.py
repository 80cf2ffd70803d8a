"""Runs `fb.export` artifacts in a process that imports only jax and numpy: argv[1] is a folder
of NAME.jax artifacts, each with NAME.npz inputs: 'images', 'sizes' (the batch sizes to call
it with) and 'weight_0', ... (the leaves of a variables argument, in flattening order, for a
program without embedded weights). The outputs of images[:n] are saved as 'n/key', or the
error as 'n/error', in NAME.out.npz."""
import os
import sys

import jax
import numpy as np
from jax import export


def run(folder):
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".jax"):
            continue
        name = os.path.join(folder, file[:-4])
        with open(name + ".jax", "rb") as f:
            program = export.deserialize(bytearray(f.read()))
        inputs = np.load(name + ".npz")
        weights = [inputs[f"weight_{i}"] for i in range(len(inputs.files) - 2)]
        results = {}
        for n in inputs["sizes"]:
            images = inputs["images"][:n]
            args, kwargs = jax.tree.unflatten(program.in_tree, [*weights, images])
            try:
                out = program.call(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (the test reads the message)
                results[f"{n}/error"] = np.array(f"{type(e).__name__}: {e}")
                continue
            results.update({f"{n}/{key}": np.asarray(value) for key, value in out.items()})
        np.savez(name + ".out.npz", **results)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "flaxbones"))
    assert not loaded, f"the worker imported {loaded}"


if __name__ == "__main__":
    run(sys.argv[1])
