"""Runs three train steps of a tiny ResNet-with-BN in a fresh process (so the fake
device count can be set before jax is imported) and saves params and batch_stats.

usage: train_worker.py OUT.npz DEVICES MODE[,MODE...] [NUM_PROCESSES PROCESS_ID PORT]
MODE: jit | fsdp | pmap | local | pmap_local (pmap with per-device BN, local's reference)
The first mode's state is created by create_train_state into its sharding; later modes
start from a host copy of it (one init compile per process).
"""
import os
import sys

out_path, n_dev, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
# Cheaper XLA compiles for tests (LLVM -O0): these runs are tiny, compile time dominates.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_dev} "
                           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
import jax  # noqa: E402

if len(sys.argv) > 4:
    from flaxbones.train import initialize
    initialize(f"127.0.0.1:{sys.argv[6]}", int(sys.argv[4]), int(sys.argv[5]))

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flaxbones import train  # noqa: E402
from flaxbones.backbones.resnet import BasicBlock, ResNet  # noqa: E402
from flaxbones.heads.classification import ClassifierHead  # noqa: E402
from flaxbones.models import Classifier  # noqa: E402

GLOBAL_BATCH, STEPS, SHAPE = 8, 3, (16, 16, 3)


def tiny_resnet(axis_name=None):
    return Classifier(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), axis_name=axis_name),
                      ClassifierHead(num_classes=10))


def batches():
    rs = np.random.RandomState(0)
    for _ in range(STEPS):
        yield {"image": rs.randn(GLOBAL_BATCH, *SHAPE).astype(np.float32),
               "label": rs.randint(0, 10, GLOBAL_BATCH).astype(np.int32)}


def fetch(x):
    """A replicated or sharded global array as numpy on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


TX = train.make_optimizer("sgd", 0.02, momentum=0.9, nesterov=True, weight_decay=1e-4)
TASK = train.Classification(label_smoothing=0.1)


HOST, EVAL = {}, {}


def eval_batch():
    """Six real examples padded to the global batch: the padding must not count."""
    b = jax.tree.map(lambda a: a[:6], next(batches()))
    return train.pad_batch(b, GLOBAL_BATCH)


def initial_state(model, mesh, rules=()):
    """Sharded init the first time, then the same values put onto the new sharding."""
    if not HOST:
        state = train.create_train_state(model, TX, jax.random.PRNGKey(0), (1, *SHAPE), mesh, rules)
        HOST["state"] = jax.device_get(state) if jax.process_count() == 1 else None
        return state
    sharding = train.state_shardings(model, TX, (1, *SHAPE), mesh, rules)
    return jax.device_put(HOST["state"].replace(apply_fn=model.apply), sharding)


def run_jit(mode):
    fsdp = 2 if mode == "fsdp" else 1
    mesh = train.make_mesh(fsdp=fsdp)
    rules = train.FSDP_RULES if fsdp > 1 else ()
    model = tiny_resnet()
    state = initial_state(model, mesh, rules)
    sharding = jax.tree.map(lambda a: a.sharding, state)
    if fsdp > 1:
        spec = state.params["backbone"]["layer4_0"]["conv2"]["kernel"].sharding.spec
        assert spec == P(None, None, None, "fsdp"), spec
    step = train.make_train_step(TASK, mesh, sharding, bn_mode="local" if mode == "local" else "global")
    n, pid = jax.process_count(), jax.process_index()
    for b in batches():
        local = jax.tree.map(lambda a: np.split(a, n)[pid], b)
        state, metrics = step(state, train.shard_batch(local, mesh))
    step.check_finite()  # the deferred non-finite check, on every process
    if mode == "jit" and n == 1:
        EVAL[mode] = train.make_eval_step(TASK, mesh, sharding)(
            state, train.shard_batch(eval_batch(), mesh))
    return state, metrics


def run_pmap(mode):
    model = tiny_resnet(None if mode == "pmap_local" else "batch")
    state = train.replicate(initial_state(model, train.make_mesh(devices=jax.devices()[:1])))
    step = train.make_pmap_train_step(TASK)
    for b in batches():
        state, metrics = step(state, train.split_batch(b))
        if mode == "pmap_local":  # per-device BN: average the running statistics as "local" does
            state = state.replace(batch_stats=jax.pmap(lambda s: jax.lax.pmean(s, "d"), "d")(
                state.batch_stats))
    step.check_finite()
    if mode == "pmap":
        EVAL[mode] = train.make_pmap_eval_step(TASK)(state, train.split_batch(eval_batch()))
    return train.unreplicate(state), metrics


def bad_inputs(mesh):
    """Error messages for a batch the data axis cannot split, and wrong label shapes."""
    errors = {}
    b = next(batches())
    try:
        train.shard_batch(jax.tree.map(lambda a: a[:6], b), mesh)
    except ValueError as e:
        errors["indivisible"] = str(e)
    try:
        train.shard_batch({"image": b["image"], "label": b["label"][:4]}, mesh)
    except ValueError as e:
        errors["ragged"] = str(e)
    return errors


results = {}
if jax.device_count() > 1 and jax.process_count() == 1:
    for k, v in bad_inputs(train.make_mesh()).items():
        results[f"error:{k}"] = np.asarray(v)
for mode in modes:
    state, metrics = (run_pmap if mode.startswith("pmap") else run_jit)(mode)
    flat = jax.tree_util.tree_flatten_with_path(
        {"params": state.params, "batch_stats": state.batch_stats})[0]
    for path, leaf in flat:
        results[f"{mode}:{train.sharding.path_str(path)}"] = fetch(leaf)
    results[f"{mode}:loss"] = np.asarray(train.summarize(jax.device_get(metrics))["loss"])
for mode, sums in EVAL.items():
    for k, v in train.summarize(jax.device_get(sums)).items():
        results[f"eval-{mode}:{k}"] = np.asarray(v)
if jax.process_index() == 0:
    np.savez(out_path, **results)
print("done", modes, flush=True)
