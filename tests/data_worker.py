"""Feeds the data pipelines into the train and eval steps on an FSDP mesh of 8 fake CPU
devices, in a fresh process so the device count is set before jax is imported.

usage: data_worker.py DATA_DIR   (prints one JSON line of results)
"""
import itertools
import json
import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
import flaxbones.data as fbd  # noqa: E402  (TensorFlow before anything else imports it)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flaxbones as fb  # noqa: E402
from flaxbones import train  # noqa: E402

TINY = "flaxbones_shapes/tiny"
mesh = train.make_mesh(fsdp=2)
common = dict(batch_size=8, data_dir=sys.argv[1], mean=(0.5,) * 3, std=(0.25,) * 3, mesh=mesh)
train_data = fbd.segmentation_pipeline(TINY, train=True, **common)
eval_data = fbd.segmentation_pipeline(TINY, train=False, **common)
classes = [fbd.classification_pipeline(TINY, train=t, image_size=16, **common) for t in (1, 0)]

model = fb.create_model("fcn", backbone="resnet18", num_classes=train_data.num_classes,
                        layers=(1, 1, 1, 1))  # a block a stage: the steps' sharding is tested
tx = train.make_optimizer("sgd", 0.01, momentum=0.9)
state = train.create_train_state(model, tx, jax.random.PRNGKey(0), (1, 32, 32, 3), mesh,
                                 rules=train.FSDP_RULES)
sharding = jax.tree.map(lambda a: a.sharding, state)
task = train.Segmentation(train_data.num_classes)
step = train.make_train_step(task, mesh, sharding)
eval_step = train.make_eval_step(task, mesh, sharding)

specs, losses, total = set(), [], None
for batch in itertools.islice(train_data, 2):
    specs |= {str(v.sharding.spec) for v in batch.values()}
    state, metrics = step(state, batch)
    losses.append(float(train.summarize(jax.device_get(metrics))["loss"]))
for batch in eval_data:
    specs |= {str(v.sharding.spec) for v in batch.values()}
    sums = jax.device_get(eval_step(state, batch))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
for data in classes:
    specs |= {str(v.sharding.spec) for v in next(iter(data)).values()}
fsdp_params = sum("fsdp" in str(s.spec) for s in jax.tree.leaves(sharding.params))
print(json.dumps({"specs": sorted(specs), "expected_spec": str(P(("data", "fsdp"))),
                  "fsdp_params": fsdp_params, "losses": losses,
                  "eval_pixels": float(total["count"])}), flush=True)
