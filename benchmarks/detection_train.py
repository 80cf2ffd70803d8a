"""Detector train-step throughput: flaxbones (a jitted flaxbones.train step) against torchvision
(eager), same weights, same batch, same targets.

    python -m benchmarks.detection_train                       # Mask R-CNN and RetinaNet at 320
    python -m benchmarks.detection_train --size 512 --images 4 --precision bf16
    python -m benchmarks.detection_train --models maskrcnn_resnet50_fpn --rois 128
    python -m benchmarks.detection_train --models maskrcnn_resnet50_fpn --positive-rois 32

torchvision's side: its preset with random weights, every backbone BatchNorm swapped for
FrozenBatchNorm2d (as its COCO recipe runs it) and every layer trainable; one step is
`loss = sum(model(images, targets).values())`, backward and `torch.optim.SGD` (momentum 0.9,
weight decay 1e-4, lr 0.02 x images / 16, torchvision's reference rule). flaxbones' side: those
weights converted with `fb.load_pretrained`, one step is `train.make_train_step(
train.Detection(), ...)` with `train.make_optimizer("sgd", ...)` at the same settings, on the
batch torchvision's own train transform makes (so the padded frame, the image sizes and the
targets agree). Both keep torchvision's sampling sizes (2000 proposals, 256 anchors and 512
RoIs per image) unless `--proposals` / `--rois` change them on both sides. Images: photo-like
noise, `--size` pixels high, 4:3. Targets: `--instances` random boxes per image with
filled-ellipse masks. The first step (flaxbones: compilation) is excluded from the rates and
reported on its own. Ratio > 1: flaxbones is faster.
"""
import argparse
import math
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks.detection import _images, _timed

MODELS = ("maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn")


def _frozen_bn(module):
    """Every BatchNorm2d below `module` swapped for a FrozenBatchNorm2d with its statistics."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen_bn(child)
    return module


def _targets(images, instances, masks, seed=0):
    """torchvision targets: random boxes (8 px to half the image) with random labels and
    filled-ellipse masks, in each image's pixels."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        h, w = img.shape[:2]
        wh = rng.uniform(8, [w / 2, h / 2], (instances, 2))
        xy = rng.uniform(0, 1, (instances, 2)) * ([w, h] - wh)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        t = {"boxes": torch.from_numpy(boxes),
             "labels": torch.from_numpy(rng.integers(1, 91, instances))}
        if masks:
            yy, xx = np.mgrid[:h, :w] + 0.5
            ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
            inside = (((xx - ctr[:, 0, None, None]) / half[:, 0, None, None]) ** 2
                      + ((yy - ctr[:, 1, None, None]) / half[:, 1, None, None]) ** 2) <= 1
            t["masks"] = torch.from_numpy(inside.astype(np.uint8))
        out.append(t)
    return out


def _flax_batch(tv, tensors, targets):
    """torchvision's train-transformed batch as a flaxbones detection batch (padded, NHWC)."""
    tv.train()
    batch, transformed = tv.transform(tensors, targets)
    images = batch.tensors.numpy().transpose(0, 2, 3, 1)
    n, hp, wp = images.shape[:3]
    g = max(len(t["boxes"]) for t in transformed)
    out = {"image": images, "image_size": np.asarray(batch.image_sizes, np.int32),
           "boxes": np.zeros((n, g, 4), np.float32), "labels": np.zeros((n, g), np.int32),
           "instance_valid": np.zeros((n, g), bool)}
    if "masks" in transformed[0]:
        out["masks"] = np.zeros((n, g, hp, wp), np.uint8)
    for i, t in enumerate(transformed):
        k = len(t["boxes"])
        out["boxes"][i, :k] = t["boxes"].numpy()
        out["labels"][i, :k] = t["labels"].numpy()
        out["instance_valid"][i, :k] = True
        if "masks" in out:
            h, w = t["masks"].shape[1:]
            out["masks"][i, :k, :h, :w] = t["masks"].numpy()
    return out


def _sampling(name, proposals, rois, positive_rois=None):
    """(torchvision kwargs, flaxbones kwargs) overriding the R-CNN sampling sizes;
    `positive_rois` caps flaxbones' mask/keypoint slots only (torchvision's heads run on the
    actual positives)."""
    if not name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
        return {}, {}
    tv = {"rpn_post_nms_top_n_train": proposals, "box_batch_size_per_image": rois}
    tv = {k: v for k, v in tv.items() if v is not None}
    extra = {"positive_rois_per_image": positive_rois} if positive_rois else {}
    return tv, {**tv, **extra}


def _check_finite(loss, side, name):
    if not math.isfinite(loss):
        raise FloatingPointError(f"{side} {name}: non-finite training loss {loss}")


def measure(name, count, size, repeats, instances=3, precision="fp32", proposals=None,
            rois=None, seed=0, positive_rois=None):
    import jax
    import torch
    import torchvision
    from jax.sharding import NamedSharding, PartitionSpec
    from torchvision.models.detection._utils import overwrite_eps

    import flaxbones as fb
    from flaxbones import train

    tv_kwargs, fb_kwargs = _sampling(name, proposals, rois, positive_rois)
    torch.manual_seed(seed)
    tv = torchvision.models.detection.__dict__[name](
        weights=None, weights_backbone=None, min_size=size, max_size=size * 5 // 3, **tv_kwargs)
    _frozen_bn(tv.backbone.body)
    overwrite_eps(tv, 0.0)  # the v1 COCO weights' FrozenBatchNorm eps, as flaxbones' presets
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.pth")
        torch.save(tv.state_dict(), path)
        variables = fb.load_pretrained(name, path, **fb_kwargs)

    images = _images(count, size, seed)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    targets = _targets(images, instances, masks=name.startswith("mask"), seed=seed)
    batch = _flax_batch(tv, tensors, targets)
    lr = 0.02 * count / 16

    tv.train()
    optimizer = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=lr,
                                momentum=0.9, weight_decay=1e-4)

    def torch_step():
        optimizer.zero_grad()
        loss = sum(tv(tensors, targets).values())
        loss.backward()
        optimizer.step()
        _check_finite(loss.item(), "torchvision", name)

    policy = train.Policy.named(precision)
    model = fb.create_model(name, **fb_kwargs, **policy.model_kwargs())
    tx = train.make_optimizer("sgd", lr, momentum=0.9, weight_decay=1e-4)
    mesh = train.make_mesh()
    params = variables["params"]
    state = jax.device_put(
        train.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                         batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                         rng=jax.random.key(seed), apply_fn=model.apply, tx=tx),
        NamedSharding(mesh, PartitionSpec()))
    step = train.make_train_step(train.Detection(), mesh, jax.tree.map(lambda a: a.sharding, state),
                                 policy=policy)
    device_batch = train.shard_batch(batch, mesh)
    flax = {"state": state}

    def flax_step():
        flax["state"], metrics = step(flax["state"], device_batch)
        jax.block_until_ready(metrics)
        flax["loss"] = metrics["loss_sum"]

    start = time.perf_counter()
    flax_step()
    first_s = time.perf_counter() - start
    torch_step()  # warm-up: torch's first step allocates and autotunes
    t_torch = _timed(torch_step, repeats)
    t_flax = _timed(flax_step, repeats)
    step.check_finite()
    _check_finite(float(flax["loss"]), "flaxbones", name)
    hp, wp = batch["image"].shape[1:3]
    return {"name": name, "size": f"{hp}x{wp}", "torch": count / t_torch,
            "flax": count / t_flax, "first_s": first_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=320, help="image height (width 4/3 of it)")
    parser.add_argument("--instances", type=int, default=3, help="ground-truth boxes per image")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="flaxbones' compute policy (torchvision runs fp32)")
    parser.add_argument("--proposals", type=int, default=None,
                        help="R-CNN proposals per image in training (default 2000)")
    parser.add_argument("--rois", type=int, default=None,
                        help="R-CNN sampled RoIs per image (default 512)")
    parser.add_argument("--positive-rois", type=int, default=None,
                        help="flaxbones' positive_rois_per_image: mask/keypoint head slots "
                             "(default: all 128 positive slots)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.images} images per step, {args.instances} boxes per "
          f"image, flaxbones {args.precision}, train images/s (median of {args.repeats} steps)")
    print("| detector | padded size | torchvision eager | flaxbones jit | ratio | first step s |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.images, args.size, args.repeats, args.instances, args.precision,
                    args.proposals, args.rois, positive_rois=args.positive_rois)
        print(f"| {r['name']} | {r['size']} | {r['torch']:.2f} | {r['flax']:.2f} | "
              f"{r['flax'] / r['torch']:.2f} | {r['first_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
