"""Peak memory of a train step with and without `train.remat_blocks`.

    python -m benchmarks.memory                   # deeplabv3plus_xception65 @512
    python -m benchmarks.memory --workloads demo deeplabv3plus_resnet101 resnet50

Each variant runs in its own process: XLA's temporary buffer size for the compiled step
(activations kept for the backward pass live there), the process's peak resident memory
(on CPU, where device memory is host memory) or the GPU's peak bytes in use, and the
step time, which remat raises by recomputing each block's forward.
"""
import argparse
import datetime
import sys

from benchmarks.run import machine, run_worker
from benchmarks.workloads import WORKLOADS

VARIANTS = {"plain": {}, "remat": {"remat": True}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["deeplabv3plus_xception65"],
                        choices=sorted(WORKLOADS))
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    args = parser.parse_args(argv)
    mem_key = "device_peak_mib" if args.platform == "gpu" else "peak_rss_mib"
    rows = []
    for workload in args.workloads:
        base = None
        for variant, options in VARIANTS.items():
            r = run_worker("flax", workload, "train", args, args.precision, options)
            print(f"# {workload} {variant}: temp {r['xla_temp_mib']:.0f} MiB, peak "
                  f"{r[mem_key]:.0f} MiB, {r['step_s']:.2f} s/step", file=sys.stderr, flush=True)
            base = base or r
            rows.append(f"| {workload} @{r['size']} | {r['batch']} | {variant} "
                        f"| {r['xla_temp_mib']:.0f} | {1 - r['xla_temp_mib'] / base['xla_temp_mib']:.0%} "
                        f"| {r[mem_key]:.0f} | {1 - r[mem_key] / base[mem_key]:.0%} "
                        f"| {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x |")
    peak = "device peak MiB" if args.platform == "gpu" else "peak RSS MiB"
    print(f"train-step memory, {datetime.date.today()}, {machine()}, {args.precision}\n")
    print(f"| workload | batch | variant | XLA temp MiB | saved | {peak} | saved | s/step | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
