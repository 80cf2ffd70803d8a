"""R-CNN train mode against torchvision 0.29's `model(images, targets)`: the same random weights,
the same two images and targets through torchvision's own train-mode transform (min_size 64),
sampling sizes that keep every candidate on both sides (so both draws are deterministic),
and every loss term, the gradient of the backbone's first conv and (v2) the RoI heads' updated
BatchNorm running statistics compared. Plus the default sampling under jit, images without
ground truth, and bad targets."""
import copy
import functools
from functools import cache
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import rcnn_ref
import torch_ref

import flaxbones as fb
import flaxbones.detection.rcnn_presets  # registers the presets

PRESETS = ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
           "maskrcnn_resnet50_fpn_v2"]
REL, GRAD_REL = 1e-4, 1e-3
# Where torchvision's own float32 conv1 gradient is ~5e-3 (relative) from its float64 one
# (measured): Keypoint R-CNN's random 8 x 512 ReLU convs (fp32 noise flips near-zero ReLU gates;
# flaxbones 1.3e-3 from torchvision's float32; its predictor's gradient is held to GRAD_REL) and
# v2's batch-statistics BatchNorm through ResNet-50 (torch 4.2e-3, flaxbones 4.4e-3 from float64).
CONV1_GRAD_REL = {"keypointrcnn_resnet50_fpn": 1e-2, "maskrcnn_resnet50_fpn_v2": 1e-2}
# every anchor sampled (about 2.3k at 96x96), every proposal + ground truth (<= 103) sampled,
# fewer positives per image than the mask / keypoint slots (checked below)
RPN_POST, RPN_BATCH, BOX_BATCH = 100, 4096, 128
FLAX_SETTINGS = {"rpn_batch_size_per_image": RPN_BATCH, "box_batch_size_per_image": BOX_BATCH,
                 "rpn_post_nms_top_n_train": RPN_POST}


def box_fraction(name: str) -> float:
    """All positives drawn; few slots where a mask / keypoint branch runs on them (12, or 16
    for Mask R-CNN v2, whose proposals hold 12 positives in image 0)."""
    if name.startswith("faster"):
        return 0.5
    return 0.125 if name.endswith("_v2") else 0.09375
# G = 3 in both images: with all 100 proposals valid every box slot is sampled, while the mask
# slots hold fewer positives (and an empty image leaves box slots unsampled), so v2's BatchNorm
# heads match torchvision's only with statistics over the valid slots alone
BOXES = ([[10, 12, 50, 40], [30, 20, 80, 60], [5, 40, 35, 68]],  # original pixels
         [[8, 10, 40, 50], [25, 30, 60, 75], [45, 5, 62, 28]])
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, diffs in MEASURED.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), end="")


def torch_targets(imgs, classes: int, keypoints: bool, empty=()):
    """Boxes, labels, filled-ellipse masks and 17 keypoints per image, in original pixels
    (image indices in `empty` get none)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (img, boxes) in enumerate(zip(imgs, BOXES)):
        boxes = torch.tensor(boxes, dtype=torch.float32)[:0 if i in empty else None]
        h, w = img.shape[1:]
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        masks = ((((xx - ctr[:, None, None, 0]) / half[:, None, None, 0]) ** 2
                  + ((yy - ctr[:, None, None, 1]) / half[:, None, None, 1]) ** 2) <= 0.8)
        t = {"boxes": boxes, "labels": 1 + torch.arange(len(boxes)) % (classes - 1),
             "masks": masks.to(torch.uint8)}
        if keypoints:
            u = torch.rand(len(boxes), 17, 2, generator=g) * 1.2 - 0.1  # some outside
            xy = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
            vis = torch.randint(0, 3, (len(boxes), 17, 1), generator=g).float()
            t["keypoints"] = torch.cat([xy, vis], -1)
        out.append(t)
    return out


def flax_targets(transformed, shape, keypoints: bool):
    """torchvision's transformed per-image targets -> the padded batch dict of the contract."""
    n, g = len(transformed), 3
    out = {"boxes": np.zeros((n, g, 4), np.float32), "labels": np.zeros((n, g), np.int32),
           "instance_valid": np.zeros((n, g), bool),
           "masks": np.zeros((n, g, *shape), np.uint8)}
    if keypoints:
        out["keypoints"] = np.zeros((n, g, 17, 3), np.float32)
    for i, t in enumerate(transformed):
        k = len(t["boxes"])
        out["boxes"][i, :k] = t["boxes"].numpy()
        out["labels"][i, :k] = t["labels"].numpy()
        out["instance_valid"][i, :k] = True
        h, w = t["masks"].shape[1:]
        out["masks"][i, :k, :h, :w] = t["masks"].numpy()
        if keypoints:
            out["keypoints"][i, :k] = t["keypoints"].numpy()
    return {k: jnp.asarray(v) for k, v in out.items()}


GRADS = {"conv1": ("backbone", "conv1", "kernel"),
         "keypoint predictor": ("roi_heads", "keypoint_predictor", "kps_score_lowres", "kernel")}


def head_bn_stats(ref):
    """{'box_head conv0': (running mean, running var), ...}: the RoI heads' BatchNorms (v2)."""
    out = {}
    for head in ("box_head", "mask_head"):
        module = getattr(ref.roi_heads, head, None)
        bns = ([] if module is None else
               [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        for i, bn in enumerate(bns):
            out[f"{head} conv{i}"] = (bn.running_mean.numpy().copy(),
                                      bn.running_var.numpy().copy())
    return out


def flax_bn_stats(batch_stats, keys):
    """`head_bn_stats`' entries from flaxbones' batch_stats."""
    out = {}
    for key in keys:
        head, conv = key.split()
        bn = batch_stats["roi_heads"][head][conv]["bn"]
        out[key] = (np.asarray(bn["mean"]), np.asarray(bn["var"]))
    return out


def torch_losses(ref, imgs, targets):
    """torchvision's train-mode loss dict, the gradients of its backbone's first conv (and
    keypoint predictor) in flaxbones' layout, and its heads' BatchNorm running statistics after
    the step, on fresh copies of the targets; its buffers are restored afterwards."""
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    ref.train()
    ref.zero_grad()
    losses = ref(imgs, copy.deepcopy(targets))
    stats = head_bn_stats(ref)
    sum(losses.values()).backward()
    with torch.no_grad():
        for k, v in ref.named_buffers():
            v.copy_(buffers[k])
    grads = {"conv1": ref.backbone.body.conv1.weight.grad.numpy().transpose(2, 3, 1, 0)}
    if ref.roi_heads.keypoint_predictor is not None:  # ConvTranspose2d: (in, out, kh, kw)
        grads["keypoint predictor"] = (ref.roi_heads.keypoint_predictor.kps_score_lowres
                                       .weight.grad.numpy().transpose(2, 3, 1, 0))
    ref.eval()
    return {k: float(v.detach()) for k, v in losses.items()}, grads, stats


@cache
def _loss_and_grad(model):
    def total(params, rest, images, sizes, targets, key):
        losses, state = model.apply({"params": params, **rest}, images, sizes, train=True,
                                    targets=targets, rngs={"sampling": key},
                                    mutable=["batch_stats", "intermediates"])
        sampled = state["intermediates"]["roi_heads"]["sampled"][0].sum(1)
        positives = state["intermediates"]["roi_heads"]["sampled_positive"][0].sum(1)
        return sum(losses.values()), (losses, jnp.stack([positives, sampled]),
                                      state["batch_stats"])
    return jax.jit(jax.value_and_grad(total, has_aux=True))


@pytest.fixture(scope="module", params=PRESETS)
def case(request, tmp_path_factory):
    name = request.param
    keypoints = name.startswith("keypoint")
    classes = 2 if keypoints else 5
    ref = rcnn_ref.build(name, classes)
    ref.rpn._post_nms_top_n["training"] = RPN_POST
    ref.rpn.fg_bg_sampler.batch_size_per_image = RPN_BATCH
    ref.roi_heads.fg_bg_sampler.batch_size_per_image = BOX_BATCH
    ref.roi_heads.fg_bg_sampler.positive_fraction = box_fraction(name)
    path = torch_ref.save_state(ref, tmp_path_factory.mktemp("rcnn") / f"{name}.pth")
    kwargs = {"num_classes": classes, "box_positive_fraction": box_fraction(name),
              **FLAX_SETTINGS}
    variables = fb.load_pretrained(name, path, **kwargs)
    model = fb.create_model(name, **kwargs)
    imgs = rcnn_ref.images()

    def run(empty=()):
        targets = torch_targets(imgs, classes, keypoints, empty)
        ref.train()
        batch, transformed = ref.transform(imgs, copy.deepcopy(targets))
        ref.eval()
        want, want_grad, want_stats = torch_losses(ref, imgs, targets)
        images = jnp.asarray(batch.tensors.numpy().transpose(0, 2, 3, 1))
        sizes = jnp.asarray(np.asarray(batch.image_sizes, np.int32))
        ft = flax_targets(transformed, images.shape[1:3], keypoints)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        (_, (got, positives, stats)), grads = _loss_and_grad(model)(
            params, rest, images, sizes, ft, jax.random.key(0))
        # fewer positives than slots: every candidate was drawn, on both sides
        positives, sampled = np.asarray(positives)
        assert (positives < int(BOX_BATCH * box_fraction(name))).all(), positives
        print(f"\n{name}: positives {positives}, sampled {sampled} per image", end="")
        got_grad = {k: np.asarray(functools.reduce(dict.get, GRADS[k], grads))
                    for k in want_grad}
        return SimpleNamespace(want=want, got={k: float(v) for k, v in got.items()},
                               want_grad=want_grad, got_grad=got_grad, want_stats=want_stats,
                               got_stats=flax_bn_stats(stats, want_stats),
                               old_stats=flax_bn_stats(rest.get("batch_stats"), want_stats))

    return SimpleNamespace(name=name, run=run, model=model, variables=variables,
                           images=imgs, classes=classes, keypoints=keypoints)


def _compare(case, result, tag=""):
    table = MEASURED.setdefault(case.name + tag, {})
    assert sorted(result.got) == sorted(result.want)
    for key, want in result.want.items():
        table[key] = abs(result.got[key] - want) / max(abs(want), 1e-12)
    assert max(table.values()) <= REL, f"{case.name}{tag}: {result.got} vs {result.want}"
    for key, want in result.want_grad.items():
        rel = CONV1_GRAD_REL.get(case.name, GRAD_REL) if key == "conv1" else GRAD_REL
        table[f"{key} grad"] = torch_ref.assert_close(result.got_grad[key], want, rel,
                                                      f"{case.name}{tag} {key} grad")
    assert case.name.endswith("_v2") == bool(result.want_stats)
    for key, want in result.want_stats.items():  # the running statistics and their step
        head = key.split()[0]
        for stat, kind in enumerate(("mean", "var")):
            got, old = result.got_stats[key][stat], result.old_stats[key][stat]
            diffs = {"": torch_ref.assert_close(got, want[stat], REL, f"{key} {kind}"),
                     " step": torch_ref.assert_close(got - old, want[stat] - old, REL,
                                                     f"{key} {kind} step")}
            for tail, diff in diffs.items():
                name = f"{head} running {kind}{tail}"
                table[name] = max(table.get(name, 0.0), diff)


def test_losses_and_gradient_match_torchvision(case):
    _compare(case, case.run())


def test_image_without_ground_truth(case):
    if case.name != "maskrcnn_resnet50_fpn":
        pytest.skip("Mask R-CNN's RPN, box and mask branches cover it (keeps the file's time "
                    "down)")
    _compare(case, case.run(empty=(1,)), " (image 1 empty)")


def test_default_sampling_under_jit(case):
    """torchvision's default sampling (256 anchors, 512 RoIs per image, 2000 proposals) under
    jit: finite losses, the box head on exactly 512 RoIs per image."""
    if case.name != PRESETS[0]:
        pytest.skip("one preset suffices")
    model = fb.create_model(case.name, num_classes=case.classes)
    images = jnp.asarray(rcnn_ref.images()[0].numpy().transpose(1, 2, 0))[None, :64, :64]
    images = jnp.concatenate([images, images[:, ::-1]], 0)
    targets = {"boxes": jnp.asarray([[[4, 6, 40, 30], [20, 10, 60, 50]]] * 2, jnp.float32),
               "labels": jnp.asarray([[1, 2]] * 2, jnp.int32),
               "instance_valid": jnp.asarray([[True, True], [True, False]])}
    apply = jax.jit(lambda v, x, t, k: model.apply(
        v, x, None, train=True, targets=t, rngs={"sampling": k},
        mutable=["batch_stats", "intermediates"]))
    losses, state = apply(case.variables, images, targets, jax.random.key(1))
    assert sorted(losses) == ["loss_box_reg", "loss_classifier", "loss_objectness",
                              "loss_rpn_box_reg"]
    assert all(np.isfinite(float(v)) for v in losses.values()), losses
    logits = state["intermediates"]["roi_heads"]["class_logits"][0]
    assert logits.shape == (2, 512, case.classes)


def test_bad_targets_raise(case):
    n, h, w = 2, 64, 64
    images = jnp.zeros((n, h, w, 3))
    good = {"boxes": jnp.asarray([[[4.0, 6, 40, 30]]] * n), "labels": jnp.ones((n, 1), jnp.int32),
            "instance_valid": jnp.ones((n, 1), bool), "masks": jnp.zeros((n, 1, h, w), jnp.uint8),
            "keypoints": jnp.zeros((n, 1, 17, 3))}
    apply = lambda t: case.model.apply(case.variables, images, train=True, targets=t,
                                       rngs={"sampling": jax.random.key(0)},
                                       mutable=["batch_stats"])
    bad = [(None, "needs targets"),
           ({k: v for k, v in good.items() if k != "labels"}, "lack"),
           ({**good, "boxes": good["boxes"][:, :, :3]}, "boxes"),
           ({**good, "instance_valid": jnp.ones((n, 2), bool)}, "instance_valid"),
           ({**good, "labels": good["labels"].astype(jnp.float32)}, "integers"),
           ({**good, "boxes": jnp.asarray([[[40.0, 6, 4, 30]]] * n)}, "positive width")]
    if case.name.startswith("mask"):
        bad += [({k: v for k, v in good.items() if k != "masks"}, "masks"),
                ({**good, "masks": good["masks"][:, :, :32]}, "masks")]
    if case.name.startswith("keypoint"):
        bad += [({k: v for k, v in good.items() if k != "keypoints"}, "keypoints"),
                ({**good, "keypoints": good["keypoints"][:, :, :5]}, "keypoints")]
    for targets, match in bad:
        with pytest.raises(ValueError, match=match):
            apply(targets)
