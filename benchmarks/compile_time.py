"""Train-step compile time, unscanned vs `scan_blocks=True` (each measurement in a fresh
process, no persistent compilation cache). Prints a markdown table.

    python -m benchmarks.compile_time [--repeat 3] [--remat]   # the table (min over runs)
    python benchmarks/compile_time.py --one resnet152 --scan   # one measurement (seconds)

"Compile" is trace + lower + XLA compile wall time (and the CPU time of all threads).
On XLA:CPU the gain is bounded: its backend already emits identical fusions of unrolled
blocks once, so scanning saves tracing and HLO passes but not most of the LLVM code
generation, and adds loop kernels (stacking residuals and gradients).
"""
import argparse
import os
import subprocess
import sys
import time

SIZES = {"resnet152": 224, "xception65": 299, "resnet50": 224, "xception71": 299}
MODELS = ["resnet152", "xception65"]


def measure(name: str, scan: bool, remat: bool = False, batch: int = 2) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads) to trace, lower and compile one SGD
    train step."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import flaxbones as fb
    from flaxbones import train

    jax.config.update("jax_enable_compilation_cache", False)
    size = SIZES[name]
    model = fb.create_model(name, num_classes=1000, scan_blocks=scan)
    model = train.remat_blocks(model) if remat else model
    mesh = train.make_mesh()
    tx = optax.sgd(0.1, momentum=0.9)
    state = jax.eval_shape(lambda rng: train.create_train_state(
        model, tx, rng, (1, size, size, 3), mesh), jax.random.PRNGKey(0))
    sharding = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
    step = train.make_train_step(train.Classification(), mesh, sharding, nonfinite="ignore")
    batch = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    wall, cpu = time.perf_counter(), time.process_time()
    step.fn.lower(state, batch).compile()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_one(name: str, scan: bool, remat: bool = False) -> tuple[float, float]:
    from benchmarks.run import worker_env

    cmd = ([sys.executable, os.path.abspath(__file__), "--one", name] + (["--scan"] if scan else [])
           + (["--remat"] if remat else []))
    out = subprocess.run(cmd, env=worker_env(), check=True, capture_output=True, text=True).stdout
    wall, cpu = map(float, out.split()[-2:])
    print(f"{name} scan={scan} remat={remat}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=sorted(SIZES), help="measure one model, in this process")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--remat", action="store_true", help="with train.remat_blocks")
    parser.add_argument("--models", nargs="*", default=MODELS, choices=sorted(SIZES))
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per cell (min)")
    args = parser.parse_args()
    if args.one:
        print(*(f"{t:.3f}" for t in measure(args.one, args.scan, args.remat)))
        return
    rows = ["| model | unscanned compile s | scanned compile s | ratio | ratio of CPU s |",
            "|---|---|---|---|---|"]
    for name in args.models:
        cells = [[run_one(name, scan, args.remat) for _ in range(args.repeat)]
                 for scan in (False, True)]
        (plain, plain_cpu), (scanned, scanned_cpu) = (map(min, zip(*c)) for c in cells)
        label = name + (" + remat_blocks" if args.remat else "")
        rows.append(f"| {label} | {plain:.1f} | {scanned:.1f} | {plain / scanned:.1f}x "
                    f"| {plain_cpu / scanned_cpu:.1f}x |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
