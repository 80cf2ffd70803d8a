"""Throughput, first-step time and peak memory of flaxbones vs the PyTorch references.

    python -m benchmarks.run                       # every workload, CPU batch sizes
    python -m benchmarks.run --workloads resnet50 --repeats 3
    python -m benchmarks.run --platform gpu --precision fp32 bf16

Every measurement runs in its own process (benchmarks/worker.py), and the frameworks
alternate (flax, torch, torch, flax, ...) so drifting machine load hits both sides. The
table gives medians over repeats and the ratio flaxbones / reference (> 1: faster).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

from benchmarks.workloads import WORKLOADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ("resnet50", "resnet101", "xception65", "mobilenet_v2",
           "deeplabv3plus_resnet101", "deeplabv3plus_xception65", "cifar_resnet18")


def worker_env() -> dict:
    """The environment of a measuring subprocess: the repository importable, and no
    persistent compilation cache (a cached compile would time as zero)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def run_worker(framework, workload, mode, args, precision, options=None) -> dict:
    """benchmarks.worker in a fresh process; `args` carries steps, platform, batch, size."""
    cmd = [sys.executable, "-m", "benchmarks.worker", "--framework", framework,
           "--workload", workload, "--mode", mode, "--steps", str(args.steps),
           "--precision", precision, "--platform", args.platform,
           "--options", json.dumps(options or {})]
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--size", str(args.size)] if args.size else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _median(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec="{:.1f}"):
    return "-" if value is None else spec.format(value)


def _ratio(a, b):
    return None if not a or not b else a / b


def summarize(results) -> list[dict]:
    """One row per (workload, precision, mode): medians of each side and the ratios."""
    rows = {}
    for r in results:
        rows.setdefault((r["workload"], r["precision"], r["mode"]), {}).setdefault(
            r["framework"], []).append(r)
    table = []
    for (workload, precision, mode), sides in rows.items():
        flax, torch = sides.get("flax", []), sides.get("torch", [])
        row = dict(workload=workload, precision=precision, mode=mode,
                   batch=(flax or torch)[0]["batch"], size=(flax or torch)[0]["size"])
        for key in ("images_per_s", "first_s", "peak_rss_mib", "device_peak_mib", "mfu",
                    "flops_per_s", "params"):
            row[f"flax_{key}"], row[f"torch_{key}"] = _median(flax, key), _median(torch, key)
        row["speed_ratio"] = _ratio(row["flax_images_per_s"], row["torch_images_per_s"])
        row["memory_ratio"] = _ratio(row["flax_peak_rss_mib"], row["torch_peak_rss_mib"])
        row["same_params"] = row["flax_params"] == row["torch_params"]
        table.append(row)
    return table


def markdown(table, gpu: bool) -> str:
    memory = "device peak MiB" if gpu else "peak RSS MiB"
    mem_key = "device_peak_mib" if gpu else "peak_rss_mib"
    head = ("| workload | prec | mode | batch | flaxbones img/s | torch img/s | ratio "
            f"| flaxbones compile s | torch 1st step s | flaxbones {memory} | torch {memory} "
            "| flaxbones GFLOP/s | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        mfu = _fmt(r["flax_mfu"] and 100 * r["flax_mfu"], "{:.0f}%")
        gflops = _fmt(r["flax_flops_per_s"] and r["flax_flops_per_s"] / 1e9, "{:.0f}")
        name = r["workload"] + ("" if r["same_params"] else " (params differ!)")
        lines.append(
            f"| {name} @{r['size']} | {r['precision']} | {r['mode']} | {r['batch']} "
            f"| {_fmt(r['flax_images_per_s'], '{:.3g}')} | {_fmt(r['torch_images_per_s'], '{:.3g}')} "
            f"| **{_fmt(r['speed_ratio'], '{:.2f}')}** | {_fmt(r['flax_first_s'])} "
            f"| {_fmt(r['torch_first_s'], '{:.2f}')} | {_fmt(r['flax_' + mem_key], '{:.0f}')} "
            f"| {_fmt(r['torch_' + mem_key], '{:.0f}')} | {gflops} | {mfu} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT), choices=sorted(WORKLOADS))
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="processes per side and row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--batch", type=int, help="override every workload's batch size")
    parser.add_argument("--size", type=int, help="override every workload's image size")
    parser.add_argument("--json", help="also write every raw measurement here")
    args = parser.parse_args(argv)

    results, flip = [], False
    for repeat in range(args.repeats):
        for workload in args.workloads:
            for precision in args.precision:
                for mode in args.modes:
                    order = ("torch", "flax") if flip else ("flax", "torch")
                    flip = not flip
                    for framework in order:
                        r = run_worker(framework, workload, mode, args, precision)
                        print(f"# {framework:5s} {workload} {precision} {mode}: "
                              f"{r['images_per_s']:.1f} img/s, first {r['first_s']:.1f} s, "
                              f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
                        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    device = results[0]["device"] if args.platform == "gpu" else machine()
    print(f"flaxbones vs PyTorch, {datetime.date.today()}, {device}; medians of {args.repeats} "
          f"process(es) x {args.steps} timed steps; ratio = flaxbones / torch images/s\n")
    print(markdown(summarize(results), args.platform == "gpu"))


if __name__ == "__main__":
    main()
