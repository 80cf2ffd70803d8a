"""Three train steps of a small Faster R-CNN (ResNet-18 FPN with BatchNorm in the backbone
and the FPN, so batch statistics are global) in a fresh process with DEVICES fake CPU devices; saves the
params, batch_stats and per-step losses.

usage: detection_worker.py OUT.npz DEVICES MODE[,MODE...]     MODE: jit | fsdp
"""
import os
import sys

out_path, n_dev, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_dev} "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
import jax  # noqa: E402
import numpy as np  # noqa: E402

import flaxbones as fb  # noqa: E402
from flaxbones import train  # noqa: E402

BATCH, STEPS, SIZE, G = 8, 3, 32, 2
ANCHORS = 3 * sum((SIZE // s) ** 2 for s in (4, 8, 16, 32, 64))  # per image, 5 levels


def model():
    """RPN sampling as usual (its labels depend on anchors and ground truth only). The RoI
    heads see every anchor's proposal (no top-n cut, no NMS) and sample all of them: at
    initialisation the objectness scores are nearly tied,
    so a 1e-7 difference in the reduction order would order the proposals differently and
    another subset would be drawn."""
    return fb.create_model("fasterrcnn", backbone="resnet18", num_classes=4, frozen_bn=False,
                           fpn_channels=32, fpn_norm=True, representation_size=64,
                           rpn_pre_nms_top_n_train=ANCHORS,
                           rpn_post_nms_top_n_train=ANCHORS, rpn_nms_thresh=1.0,
                           rpn_batch_size_per_image=32, box_batch_size_per_image=ANCHORS + G,
                           box_positive_fraction=1.0, cpu_kernels=False)


def batches():
    """Images with rectangles of random classes."""
    rs = np.random.RandomState(0)
    for _ in range(STEPS):
        xy = rs.uniform(0, SIZE - 16, (BATCH, G, 2))
        boxes = np.concatenate([xy, xy + rs.uniform(6, 16, (BATCH, G, 2))], -1)
        valid = np.arange(G)[None] < rs.randint(0, G + 1, (BATCH, 1))
        yield {"image": rs.randn(BATCH, SIZE, SIZE, 3).astype(np.float32),
               "image_size": np.full((BATCH, 2), SIZE, np.int32),
               "boxes": boxes.astype(np.float32), "labels": rs.randint(1, 4, (BATCH, G)),
               "instance_valid": valid}


TX = train.make_optimizer("sgd", 0.01, momentum=0.9, weight_decay=1e-4)
TASK = train.Detection()
HOST = {}

results = {}
for mode in modes:
    mesh = train.make_mesh(fsdp=2 if mode == "fsdp" else 1)
    rules = train.FSDP_RULES if mode == "fsdp" else ()
    net = model()
    if not HOST:
        state = train.create_train_state(net, TX, jax.random.PRNGKey(0), (1, SIZE, SIZE, 3),
                                         mesh, rules)
        HOST["state"] = jax.device_get(state)
    else:
        sharding = train.state_shardings(net, TX, (1, SIZE, SIZE, 3), mesh, rules)
        state = jax.device_put(HOST["state"].replace(apply_fn=net.apply), sharding)
    step = train.make_train_step(TASK, mesh, jax.tree.map(lambda a: a.sharding, state))
    for i, b in enumerate(batches()):
        state, metrics = step(state, train.shard_batch(b, mesh))
        for k, v in train.summarize(jax.device_get(metrics)).items():
            if k.startswith("loss"):
                results[f"{mode}:step{i}:{k}"] = np.asarray(v)
    step.check_finite()
    flat = jax.tree_util.tree_flatten_with_path(
        {"params": state.params, "batch_stats": state.batch_stats})[0]
    for path, leaf in flat:
        results[f"{mode}:{train.sharding.path_str(path)}"] = np.asarray(leaf)
np.savez(out_path, **results)
