"""Subprocess side of the checkpoint tests: a tiny deterministic training run.

    python checkpoint_worker.py train DIR --until N [--devices D] [--save-every K]
                                [--then DIR2:N2 ...]  (more runs, one after another)
    python checkpoint_worker.py kill-during-save DIR
    python checkpoint_worker.py sigterm DIR
    python checkpoint_worker.py restore DIR --devices D
    python checkpoint_worker.py multihost DIR --process I --port P

The XLA device count is set from --devices before jax is imported.
"""
import argparse
import os
import signal
import sys

args = argparse.ArgumentParser()
args.add_argument("mode")
args.add_argument("directory")
args.add_argument("--until", type=int, default=4)
args.add_argument("--devices", type=int, default=1)
args.add_argument("--save-every", type=int, default=2)
args.add_argument("--process", type=int, default=0)
args.add_argument("--port", type=int, default=0)
args.add_argument("--then", action="append", default=[])
args = args.parse_args()
# Cheaper XLA compiles (LLVM -O0, as tests/conftest.py sets): the runs are tiny.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import struct  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import flaxbones as fb  # noqa: E402
from flaxbones.backbones.resnet import BasicBlock, ResNet  # noqa: E402
from flaxbones.heads import ClassifierHead  # noqa: E402
from flaxbones.train.checkpoint import Checkpoints, PreemptionGuard, abstract_state_like  # noqa: E402

# cpu_kernels given: resolving the default would start JAX's backend before
# jax.distributed.initialize, which must come first.
MODEL = fb.Classifier(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), cpu_kernels=True),
                      ClassifierHead(num_classes=4, drop_rate=0.2))
TX = optax.sgd(0.05, momentum=0.9)
BATCH, SIZE = 8, 32


class State(struct.PyTreeNode):
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array


def batch_at(position):
    """The batch a deterministic pipeline yields at `position`."""
    key = jax.random.fold_in(jax.random.PRNGKey(42), position)
    images = jax.random.normal(key, (BATCH, SIZE, SIZE, 3))
    return images, jax.random.randint(jax.random.fold_in(key, 1), (BATCH,), 0, 4)


@jax.jit  # one program: op by op, init compiles each of its operations on its own
def init_state():
    variables = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    return State(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                 TX.init(variables["params"]), jax.random.PRNGKey(7))


@jax.jit
def train_step(state, images, labels):
    rng, dropout = jax.random.split(state.rng)

    def loss_fn(params):
        out, updates = MODEL.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                   train=True, mutable=["batch_stats"], rngs={"dropout": dropout})
        return optax.softmax_cross_entropy_with_integer_labels(out["out"], labels).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = TX.update(grads, state.opt_state, state.params)
    return State(state.step + 1, optax.apply_updates(state.params, deltas),
                 updates["batch_stats"], opt_state, rng)


def sharded_abstract(mesh):
    """The state's shapes, parameters sharded over 'data' where the first axis divides."""
    shapes = jax.eval_shape(init_state)

    def spec(x):
        n = mesh.shape["data"]
        return NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % n == 0 else P())
    return abstract_state_like(shapes, jax.tree.map(spec, shapes))


def run(directory, until, save_every, guard=None):
    """Train to `until`, resuming from `directory` when it holds a checkpoint."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with Checkpoints(directory, save_every=save_every, keep=2, meta={"model": "resnet18"}) as ckpt:
        if ckpt.latest_step is None:
            state, position = init_state(), 0
        else:
            restored = ckpt.restore(sharded_abstract(mesh))
            state, position = restored.state, restored.data
        while int(state.step) < until:
            state = train_step(state, *batch_at(position))
            position += 1
            step = int(state.step)
            print(f"step {step}", flush=True)
            if guard is not None and guard.should_stop(step):
                ckpt.save(step, state, data=position, force=True)
                ckpt.wait()
                print(f"preempted at {step}", flush=True)
                return state
            ckpt.save(step, state, data=position, force=step == until)
    return state


def main():
    if args.mode == "train":
        for run_args in [f"{args.directory}:{args.until}", *args.then]:
            directory, until = run_args.rsplit(":", 1)
            state = run(directory, int(until), args.save_every)
            np.savez(os.path.join(directory, f"final_{until}.npz"),
                     *[np.asarray(x) for x in jax.tree.leaves(state)])
    elif args.mode == "restore":
        mesh = Mesh(np.array(jax.devices()), ("data",))
        with Checkpoints(args.directory) as ckpt:
            restored = ckpt.restore(sharded_abstract(mesh))
        kernel = restored.state.params["backbone"]["conv1"]["kernel"]
        assert kernel.sharding.mesh.devices.size == args.devices, kernel.sharding
        np.savez(os.path.join(args.directory, f"restored_{args.devices}.npz"),
                 *[np.asarray(x) for x in jax.tree.leaves(restored.state)])
        print(f"restored step {restored.step} on {args.devices} devices", flush=True)
    elif args.mode == "kill-during-save":
        with Checkpoints(args.directory, save_every=1) as ckpt:
            state = init_state()
            ckpt.save(1, state, data=1)
            ckpt.wait()
            big = {"blob": jnp.ones((64, 1024, 1024)), "state": state}
            ckpt.save(2, big, data=2)
            os.kill(os.getpid(), signal.SIGKILL)
    elif args.mode == "sigterm":
        with PreemptionGuard() as guard:
            run(args.directory, 10_000, save_every=10_000, guard=guard)
    elif args.mode == "multihost":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2,
                                   process_id=args.process)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        shardings = NamedSharding(mesh, P("data"))
        i = args.process
        local = np.arange(16, dtype=np.float32).reshape(8, 2)[i * 4:(i + 1) * 4]
        tree = {"x": jax.make_array_from_process_local_data(shardings, local)}
        with Checkpoints(args.directory, save_every=1) as ckpt:
            ckpt.save(3, tree, data=3)
            ckpt.wait()
            restored = ckpt.restore(abstract_state_like(tree))
        x = restored.state["x"]
        ok = all(np.array_equal(np.asarray(s.data), np.asarray(t.data))
                 for s, t in zip(x.addressable_shards, tree["x"].addressable_shards))
        print(f"process {args.process} restored step {restored.step} equal {ok}", flush=True)
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
