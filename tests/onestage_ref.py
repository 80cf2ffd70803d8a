"""Shared parts of the one-stage detector parity tests (RetinaNet, FCOS, SSD): torchvision run
step by step on its own transform's batch, flaxbones on the same batch, detections matched."""
import jax
import numpy as np
import torch

import flaxbones as fb
import torch_ref


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (torch_ref) and GroupNorm affine parameters."""
    torch_ref.randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.2)
    return model.eval()


def calibrate(model: torch.nn.Module, imgs) -> torch.nn.Module:
    """Running statistics of every BatchNorm set to its batch statistics on `imgs` (one
    train-mode pass through backbone and head): random weights then keep spatial detail
    instead of collapsing to near-constant maps, whose near-tied scores make NMS arbitrary."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, the batch statistics
    with torch.no_grad():
        batch = model.transform(imgs)[0].tensors
        model.train()
        model.head(list(model.backbone(batch).values()))
    return model.eval()


def images(sizes=((97, 131), (115, 89)), seed=0):
    """Two CHW float images in [0, 1] of different odd sizes."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def run_torchvision(model, imgs, dense: bool = True) -> dict:
    """torchvision's eval forward split into its steps: the transformed batch (NHWC numpy),
    image_sizes, the feature maps (NHWC), head outputs, anchors and the detections in the
    padded frame (postprocess_detections, before the transform's postprocess)."""
    with torch.no_grad():
        batch, _ = model.transform(imgs)
        feats = list(model.backbone(batch.tensors).values())
        head = model.head(feats)
        anchors = model.anchor_generator(batch, feats)
        if dense:  # RetinaNet / FCOS split the outputs per level first
            hw = [x.shape[2] * x.shape[3] for x in feats]
            per = head["cls_logits"].shape[1] // sum(hw)
            counts = [n * per for n in hw]
            split = {k: list(v.split(counts, 1)) for k, v in head.items()}
            dets = model.postprocess_detections(split, [list(a.split(counts)) for a in anchors],
                                                batch.image_sizes)
        else:
            dets = model.postprocess_detections(head, anchors, batch.image_sizes)
    return {"images": batch.tensors.permute(0, 2, 3, 1).numpy(),
            "image_sizes": np.asarray(batch.image_sizes, np.int32),
            "features": [x.permute(0, 2, 3, 1).numpy() for x in feats],
            "head": {k: v.numpy() for k, v in head.items()}, "anchors": anchors[0].numpy(),
            "detections": [{k: v.numpy() for k, v in d.items()} for d in dets]}


def run_flax(model, variables, ref):
    """(outputs, intermediates) of the flaxbones model on torchvision's batch, under jit."""
    fn = jax.jit(lambda v, x, s: model.apply(v, x, s, mutable=["intermediates"]))
    out, state = fn(variables, ref["images"], ref["image_sizes"])
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    return jax.device_get(out), jax.device_get(inter)


def load(name, model, tmp_dir, **kwargs):
    """Variables of preset `name` from `model`'s state dict, via fb.load_pretrained."""
    path = torch_ref.save_state(model, tmp_dir / f"{name}.safetensors")
    return fb.load_pretrained(name, path, **kwargs), path


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def published_count(model, params) -> int:
    """The parameter count torchvision publishes: FrozenBatchNorm's weight and bias are
    buffers there, so a frozen backbone's BN scale/bias leave the count."""
    if not getattr(model.backbone, "frozen_bn", False):
        return count(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(int(np.prod(leaf.shape)) for path, leaf in flat
               if not (path[0].key == "backbone" and "bn" in path[-2].key))


def _iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def match_detections(expected: list, out: dict, score_thresh: float, tol=1e-4, edge=1e-5):
    """One-to-one: every torchvision detection has a flaxbones one with the same label, IoU >=
    0.99 (or every coordinate within 0.01 px: boxes clipped flat have no IoU) and |score diff|
    <= `tol`, and vice versa; unmatched ones are allowed only within `edge` of the score
    threshold, of the last kept score (a cut-off tie), or of an equal-label detection of the
    other side (an NMS tie between equal scores). Returns
    (matched pairs, max |score diff|, unmatched allowed)."""
    pairs, worst, excused = 0, 0.0, 0
    for i, ref in enumerate(expected):
        valid = out["valid"][i]
        got = {k: np.asarray(out[k][i])[valid] for k in ("boxes", "scores", "labels")}
        assert np.all(np.diff(got["scores"]) <= 0), "valid detections not by descending score"
        assert not np.any(np.asarray(out["scores"][i])[~valid]), "invalid slots must hold 0"
        iou = _iou(ref["boxes"], got["boxes"]) if len(got["boxes"]) and len(ref["boxes"]) else \
            np.zeros((len(ref["boxes"]), len(got["boxes"])))
        same = np.abs(ref["boxes"][:, None] - got["boxes"][None, :]).max(-1, initial=0) <= 1e-2
        ok = (((iou >= 0.99) | same) & (ref["labels"][:, None] == got["labels"][None, :])
              & (np.abs(ref["scores"][:, None] - got["scores"][None, :]) <= tol))
        used = np.zeros(len(got["boxes"]), bool)
        last = min(ref["scores"].min(initial=np.inf), got["scores"].min(initial=np.inf))

        def excusable(score, label, other, last=last):
            """At the threshold, at the last kept score, or an NMS tie: the other side kept
            a box of the same label and score (a different box of equal score survived)."""
            tie = np.any((other["labels"] == label) & (np.abs(other["scores"] - score) <= edge))
            return abs(score - score_thresh) <= edge or abs(score - last) <= edge or tie

        for r in range(len(ref["boxes"])):
            cand = np.nonzero(ok[r] & ~used)[0]
            if cand.size:
                c = cand[np.argmin(np.abs(got["scores"][cand] - ref["scores"][r]))]
                used[c] = True
                pairs += 1
                worst = max(worst, float(abs(got["scores"][c] - ref["scores"][r])))
            else:
                assert excusable(ref["scores"][r], ref["labels"][r], got), (
                    f"image {i}: torchvision detection {r} (label {ref['labels'][r]}, score "
                    f"{ref['scores'][r]:.6f}, box {ref['boxes'][r]}) has no match")
                excused += 1
        for c in np.nonzero(~used)[0]:
            assert excusable(got["scores"][c], got["labels"][c], ref), (
                f"image {i}: flaxbones detection {c} (label {got['labels'][c]}, score "
                f"{got['scores'][c]:.6f}) has no torchvision match")
            excused += 1
    return pairs, worst, excused
