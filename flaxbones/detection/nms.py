"""Greedy NMS with a fixed output size, keeping exactly what torchvision.ops.nms / batched_nms keep.

Boxes are visited in torchvision's order (valid first, score descending, index ascending: its
stable CPU sort) in tiles under a lax.while_loop that stops once `max_output` boxes are kept or
no valid box is left. A tile is suppressed by the boxes already kept, then resolved exactly within
itself by a fixed-point iteration of the greedy rule (box j survives iff no earlier surviving box
overlaps it; settles in at most tile-size steps). The order comes from a cheap top_k prefix first
and from a full sort only when that prefix does not fill the output.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxbones.detection.boxes import box_iou, no_fma

_TILE = 256
_PREFIX = 1024  # candidates taken by top_k before falling back to a full sort
# torchvision.ops.batched_nms on CPU offsets boxes per class (one nms call) while boxes.numel()
# <= 4000 and loops over classes above that; the two differ in float rounding, so mirror the switch.
_TRICK_MAX_NUMEL = 4000


def _threshold(iou_threshold):
    """float32 t with (iou > t) == (float64(iou) > iou_threshold): torchvision's kernel compares the
    float32 IoU with the threshold as a double, so round the threshold down, not to nearest."""
    if isinstance(iou_threshold, jax.Array):  # tracers are jax.Arrays too
        return jnp.asarray(iou_threshold, jnp.float32)  # traced: nearest float32 (documented)
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def _tiles(boxes, ids, labels, alive, end, thr, carry, first_tile, tile):
    """Greedy NMS over `boxes` in visiting order (length a multiple of `tile`), from tile
    `first_tile`, continuing `carry` = (count, out ids, kept boxes, kept labels). `alive` marks the
    boxes to visit, all before position `end`; `labels` None or class ids (only same-class boxes
    suppress each other). Stops once every output slot is filled."""
    n_tiles = boxes.shape[0] // tile
    max_output = carry[1].shape[0]
    upper = jnp.triu(jnp.ones((tile, tile), bool), 1)  # upper[i, j]: i is visited before j
    slots = jnp.arange(max_output)

    def cond(state):
        t, (count, _, _, _) = state
        return (t < n_tiles) & (count < max_output) & (t * tile < end)

    def body(state):
        t, (count, out, kept, kept_lab) = state
        start = t * tile
        tb = lax.dynamic_slice_in_dim(boxes, start, tile)
        ok = lax.dynamic_slice_in_dim(alive, start, tile)
        by_kept = (box_iou(tb, kept) > thr) & (slots < count)[None, :]
        tl = None if labels is None else lax.dynamic_slice_in_dim(labels, start, tile)
        if labels is not None:
            by_kept &= tl[:, None] == kept_lab[None, :]
        ok &= ~jnp.any(by_kept, axis=1)

        def within(carry):
            count, out, kept, kept_lab = carry
            over = (box_iou(tb, tb) > thr) & upper
            if labels is not None:
                over &= tl[:, None] == tl[None, :]

            def step(c):
                keep, _ = c
                new = ok & ~jnp.any(over & keep[:, None], axis=0)
                return new, jnp.any(new != keep)

            keep = lax.while_loop(lambda c: c[1], step, (ok, True))[0]
            dest = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_output)
            out = out.at[dest].set(lax.dynamic_slice_in_dim(ids, start, tile), mode="drop")
            kept = kept.at[dest].set(tb, mode="drop")
            if labels is not None:
                kept_lab = kept_lab.at[dest].set(tl, mode="drop")
            count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_output)
            return count, out, kept, kept_lab

        # a tile the kept boxes already suppressed entirely costs only its (tile, kept) IoU
        carry = lax.cond(jnp.any(ok), within, lambda c: c, (count, out, kept, kept_lab))
        return t + 1, carry

    return lax.while_loop(cond, body, (jnp.asarray(first_tile, jnp.int32), carry))[1]


def _nms(boxes, scores, labels, iou_threshold, max_output, valid, offsets_fn):
    n = boxes.shape[0]
    if n == 0 or max_output == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
    thr = _threshold(iou_threshold)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    scores = jnp.asarray(scores)
    boxes, labels = offsets_fn(boxes, valid, labels)
    tile = min(_TILE, -(-n // 8) * 8)
    pad = -n % tile
    boxes, valid = jnp.pad(boxes, ((0, pad), (0, 0))), jnp.pad(valid, (0, pad))
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)  # -0.0 -> 0.0
    scores = jnp.pad(scores, (0, pad))
    labels = None if labels is None else jnp.pad(labels, (0, pad))
    ids = jnp.arange(n + pad, dtype=jnp.int32)
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    carry = (jnp.int32(0), jnp.zeros((max_output,), jnp.int32),
             jnp.zeros((max_output, 4), boxes.dtype),
             jnp.zeros((max_output,), jnp.int32 if labels is None else labels.dtype))

    def sorted_pass(carry, skip):
        # the exact visiting order: valid first, score descending, index ascending (stable).
        # `count >= 0` always holds; it ties the sort to the loop state so XLA cannot hoist the
        # sort out of the run-at-most-once loop below (it did, under vmap: a sort every call)
        live = valid & (carry[0] >= 0)
        _, _, order = lax.sort((~live, -scores, ids), num_keys=2, is_stable=True)
        lab = None if labels is None else labels[order]
        alive = valid[order] & (ids >= skip)
        return _tiles(boxes[order], order, lab, alive, n_valid, thr, carry, skip // tile, tile)

    prefix = min(n + pad, -(-max(_PREFIX, 2 * max_output) // tile) * tile)
    if prefix >= n + pad:
        carry = sorted_pass(carry, 0)
    else:
        # top_k is far cheaper than a full sort and keeps ties in index order; its entries
        # with a finite key are exactly the first m of the visiting order. Sort only if they
        # do not fill up.
        key = jnp.where(valid, scores, -jnp.inf)
        top, idx = lax.top_k(key, prefix)
        trusted = top > -jnp.inf
        m = jnp.sum(trusted, dtype=jnp.int32)
        lab = None if labels is None else labels[idx]
        carry = _tiles(boxes[idx], idx, lab, trusted, m, thr, carry, 0, tile)
        need = (carry[0] < max_output) & (m < n_valid)
        # a while_loop run at most once: under vmap the sort runs only if some image needs it
        _, carry = lax.while_loop(lambda s: s[0], lambda s: (False, sorted_pass(s[1], m)),
                                  (need, carry))
    count, out = carry[0], carry[1]
    keep_valid = jnp.arange(max_output) < count
    return jnp.where(keep_valid, out, 0), keep_valid


def nms(boxes, scores, iou_threshold, max_output, valid=None):
    """torchvision.ops.nms with a fixed output: (keep (max_output,) int32 indices into the input,
    descending score, ties by lower index; keep_valid (max_output,) bool). Invalid entries are
    never kept nor suppress; padding slots hold index 0. Single image: jax.vmap for a batch."""
    return _nms(boxes, scores, None, iou_threshold, max_output, valid, lambda b, v, l: (b, l))


def batched_nms(boxes, scores, idxs, iou_threshold, max_output, valid=None):
    """torchvision.ops.batched_nms (NMS within each class id `idxs`) with nms()'s fixed output.
    `valid` must mark exactly the boxes torchvision would be given: like torchvision on CPU, while
    their count * 4 <= 4000 the boxes are offset by class * (max valid coordinate + 1) (its
    coordinate trick, rounding included), above that classes are separated exactly."""

    def offsets(b, v, labels):
        trick = jnp.sum(v) * 4 <= _TRICK_MAX_NUMEL
        max_coord = jnp.max(jnp.where(v[:, None], b, -jnp.inf))
        off = no_fma(labels.astype(b.dtype) * (max_coord + jnp.asarray(1, b.dtype)))
        b = jnp.where(trick, b + off[:, None], b)
        # under the trick every box shares one "class"; otherwise compare the real ids
        return b, jnp.where(trick, jnp.zeros_like(labels), labels)

    return _nms(boxes, scores, jnp.asarray(idxs), iou_threshold, max_output, valid, offsets)
