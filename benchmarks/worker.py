"""One measurement in a fresh process: a framework, a workload, train or inference.

    python -m benchmarks.worker --framework flax --workload resnet50 --mode train

prints one line `RESULT {json}`: images/s (median over timed steps), the first step's
time (flaxbones: the step's compile time, from lower().compile(); torch: the first eager
step), the process's peak resident memory, device memory on a GPU, parameter count and,
for flaxbones, XLA's FLOP count of the step (hence FLOP/s and, on a known GPU, MFU).
A fresh process per measurement keeps peak memory and caches per workload.
"""
import argparse
import json
import os
import resource
import statistics
import time

import numpy as np

from benchmarks.workloads import WORKLOADS

# Dense peak FLOP/s per device kind and precision (vendor data sheets, SXM parts).
PEAK_FLOPS = {
    ("H100", "bf16"): 989e12, ("H100", "fp32"): 67e12,
    ("H200", "bf16"): 989e12, ("H200", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp32"): 19.5e12,
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _inputs(workload, batch, size, rng):
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    if workload.task == "classification":
        labels = rng.integers(0, workload.num_classes, (batch,)).astype(np.int32)
    else:
        labels = rng.integers(0, workload.num_classes, (batch, size, size)).astype(np.int32)
    return images, labels


def run_flax(workload, mode, batch, size, steps, precision, options):
    import jax
    import jax.numpy as jnp
    import optax

    import flaxbones as fb
    from flaxbones import train

    policy = train.Policy.named(precision)
    model = fb.create_model(workload.model, num_classes=workload.num_classes,
                            **policy.model_kwargs(),
                            **{**workload.model_kwargs, **options.get("model_kwargs", {})})
    if options.get("remat"):
        model = train.remat_blocks(model)
    images, labels = _inputs(workload, batch, size, np.random.default_rng(0))
    mesh = train.make_mesh()
    if mode == "train":
        state = train.create_train_state(model, optax.sgd(0.01, momentum=0.9), jax.random.key(0),
                                         (1, size, size, 3), mesh, policy=policy)
        params = sum(a.size for a in jax.tree.leaves(state.params))
        task = (train.Classification() if workload.task == "classification"
                else train.Segmentation(workload.num_classes))
        key = task.label_key
        batch_arrays = train.shard_batch({"image": images, key: labels}, mesh)
        step = train.make_train_step(task, mesh, jax.tree.map(lambda a: a.sharding, state),
                                     policy=policy, nonfinite="ignore")
        start = time.perf_counter()
        compiled = step.fn.lower(state, batch_arrays).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def one_step():
            holder["state"], metrics = compiled(holder["state"], batch_arrays)
            jax.block_until_ready(metrics)
    else:
        x = jax.device_put(jnp.asarray(images, policy.compute_dtype))
        variables = jax.jit(lambda rng: model.init(rng, x[:1], train=False))(jax.random.key(0))
        params = sum(a.size for a in jax.tree.leaves(variables["params"]))
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        start = time.perf_counter()
        compiled = fn.lower(variables, x).compile()
        compile_s = time.perf_counter() - start

        def one_step():
            jax.block_until_ready(compiled(variables, x))
    one_step()
    times = _time_steps(one_step, steps)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return dict(
        first_s=compile_s, times=times, params=int(params), flops=float(cost.get("flops", 0)),
        xla_temp_mib=getattr(memory, "temp_size_in_bytes", 0) / 2**20,
        device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20,
        device=f"{device.platform}:{device.device_kind}")


def run_torch(workload, mode, batch, size, steps, precision, options):
    import torch

    from benchmarks import torch_models

    if workload.reference is None:
        raise ValueError(f"workload {workload.name!r} has no PyTorch reference; "
                         "measure it with benchmarks.memory")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(os.cpu_count())
    model = torch_models.build(workload.reference, workload.num_classes).to(dev)
    params = sum(p.numel() for p in model.parameters())
    images, labels = _inputs(workload, batch, size, np.random.default_rng(0))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(dev)
    y = torch.from_numpy(labels).long().to(dev)
    if cuda:  # the fast recipe on GPUs: channels_last, and autocast for bf16
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def one_step():
            opt.zero_grad(set_to_none=True)
            with amp:
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
            loss.backward()
            opt.step()
            sync()
    else:
        model.eval()

        def one_step():
            with torch.inference_mode(), amp:
                model(x)
            sync()
    first_s = _time_steps(one_step, 1)[0]
    times = _time_steps(one_step, steps)
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0
    return dict(first_s=first_s, times=times, params=int(params), flops=0.0, xla_temp_mib=0.0,
                device_peak_mib=device_peak,
                device=f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu")


def measure(framework, workload_name, mode, *, batch=None, size=None, steps=5,
            precision="fp32", platform="cpu", options=None) -> dict:
    workload = WORKLOADS[workload_name]
    batch = batch or workload.batch_for(platform)
    size = size or workload.size
    runner = {"flax": run_flax, "torch": run_torch}[framework]
    out = runner(workload, mode, batch, size, steps, precision, options or {})
    median = statistics.median(out["times"])
    out.update(framework=framework, workload=workload_name, mode=mode, batch=batch, size=size,
               precision=precision, images_per_s=batch / median, step_s=median,
               peak_rss_mib=peak_rss_mib())
    kind = next((k for (k, p) in PEAK_FLOPS if k in out["device"] and p == precision), None)
    out["flops_per_s"] = out["flops"] / median
    out["mfu"] = out["flops_per_s"] / PEAK_FLOPS[(kind, precision)] if kind else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("flax", "torch"), required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--mode", choices=("train", "infer"), required=True)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--options", default="{}", help="JSON: {'remat': true, 'model_kwargs': {...}}")
    args = parser.parse_args(argv)
    result = measure(args.framework, args.workload, args.mode, batch=args.batch, size=args.size,
                     steps=args.steps, precision=args.precision, platform=args.platform,
                     options=json.loads(args.options))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
