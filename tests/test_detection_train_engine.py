"""The train engine's options on a detector (a small Faster R-CNN on ResNet-18, one
device): gradient accumulation with remat, bf16, EMA, against the plain step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbones as fb
from flaxbones import train
from torch_ref import random_variables

SIZE, G = 32, 2
ANCHORS = 3 * sum((-(-SIZE // s)) ** 2 for s in (4, 8, 16, 32, 64))  # the pool level is 1x1
MESH = train.make_mesh()
TX = train.make_optimizer("sgd", 0.01, momentum=0.9, weight_decay=1e-4)


def detector(**kw):
    """Sampling keeps every anchor and proposal, so a batch's draw does not depend on how
    it is split into micro-batches."""
    return fb.create_model("fasterrcnn", backbone="resnet18", num_classes=4, fpn_channels=32,
                           representation_size=64, rpn_pre_nms_top_n_train=ANCHORS,
                           rpn_post_nms_top_n_train=ANCHORS, rpn_nms_thresh=1.0,
                           rpn_batch_size_per_image=ANCHORS, rpn_positive_fraction=1.0,
                           box_batch_size_per_image=ANCHORS + G, box_positive_fraction=1.0,
                           cpu_kernels=False, **kw)


def batch_of(n, seed=0):
    rs = np.random.RandomState(seed)
    xy = rs.uniform(0, SIZE - 16, (n, G, 2))
    boxes = np.concatenate([xy, xy + rs.uniform(6, 16, (n, G, 2))], -1).astype(np.float32)
    return {"image": rs.randn(n, SIZE, SIZE, 3).astype(np.float32),
            "image_size": np.full((n, 2), SIZE, np.int32), "boxes": boxes,
            "labels": rs.randint(1, 4, (n, G)), "instance_valid": np.ones((n, G), bool)}


def state_and_step(model, policy=train.Policy(), **kw):
    state = train.create_train_state(model, TX, jax.random.PRNGKey(0), (1, SIZE, SIZE, 3), MESH,
                                     policy=policy, ema_decay=kw.pop("ema_decay", None))
    step = train.make_train_step(train.Detection(), MESH, jax.tree.map(lambda a: a.sharding, state),
                                 policy=policy, **kw)
    return state, step


@pytest.fixture(scope="module")
def plain():
    """Two plain steps on [A, B] with EMA: the params before and after each step, the final
    state and every step's loss terms."""
    state, step = state_and_step(detector(), ema_decay=0.9)
    params, metrics = [jax.device_get(state.params)], []
    for _ in range(2):
        state, m = step(state, batch_of(2))
        params.append(jax.device_get(state.params))
        metrics.append(train.summarize(jax.device_get(m)))
    step.check_finite()
    return params, jax.device_get(state), metrics


def test_accumulation_with_remat_equals_the_whole_batch(plain):
    """[A, A, B, B] in 2 micro-batches of [A, B] (remat blocks): the same update as one step
    on [A, B]: the detectors' losses are means over a batch, and both halves are [A, B]."""
    _, ref, ref_metrics = plain
    model = train.remat_blocks(detector())
    state, step = state_and_step(model, accum_steps=2)
    ab = batch_of(2)
    doubled = {k: np.repeat(v, 2, axis=0) for k, v in ab.items()}
    for ref_m in ref_metrics:
        state, m = step(state, doubled)
        m = train.summarize(jax.device_get(m))
        for k in ref_m:
            if k.startswith("loss"):
                np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ema_follows_the_params(plain):
    """EMA at decay 0.9 from the initial params p0: after two steps 0.81 p0 + 0.09 p1 + 0.1 p2."""
    params, final, _ = plain
    expected = jax.tree.map(lambda a, b, c: 0.81 * a + 0.09 * b + 0.1 * c, *params)
    for e, x in zip(jax.tree.leaves(final.ema_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-7)
    moved = [not np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, params[:2]))]
    assert sum(moved) > len(moved) // 2


def test_bf16_trains_with_fp32_params_and_close_losses(plain):
    _, _, ref_metrics = plain
    policy = train.Policy.named("bf16")
    state, step = state_and_step(detector(**policy.model_kwargs()), policy=policy)
    state, m = step(state, batch_of(2))
    step.check_finite()
    m = train.summarize(jax.device_get(m))
    for k in ("loss_objectness", "loss_classifier"):
        np.testing.assert_allclose(m[k], ref_metrics[0][k], rtol=0.05, err_msg=k)
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_mask_head_on_a_random_subset_of_positives():
    """`positive_rois_per_image=K`: the mask head trains on K slots per image, drawn from the
    positives. With K the largest positive count (below the 16 slots), every positive is
    drawn: the same losses as on all of them (torchvision's)."""
    batch = batch_of(2, seed=3)
    masks = np.zeros((2, G, SIZE, SIZE), np.uint8)
    for i, j in np.ndindex(2, G):
        x0, y0, x1, y1 = batch["boxes"][i, j].astype(int)
        masks[i, j, y0:y1, x0 + 1:x1] = 1
    targets = {"boxes": batch["boxes"], "labels": batch["labels"],
               "instance_valid": batch["instance_valid"], "masks": masks}

    def losses(k):
        model = fb.create_model("maskrcnn", backbone="resnet18", num_classes=4,
                                fpn_channels=16, representation_size=32, mask_channels=8,
                                mask_dim_reduced=8, box_batch_size_per_image=64,
                                positive_rois_per_image=k, roi_align="matmul")
        fn = jax.jit(lambda v: model.apply(v, batch["image"], batch["image_size"], train=True,
                                           targets=targets, rngs={"sampling": jax.random.key(2)},
                                           mutable=["batch_stats", "intermediates"]))
        out, state = fn(variables)
        inter = state["intermediates"]["roi_heads"]
        return ({k: float(v) for k, v in out.items()}, inter["mask_logits"][0].shape,
                np.asarray(inter["sampled_positive"][0]).sum(1))

    variables = random_variables(fb.create_model(  # numpy-filled: init's compile costs more
        "maskrcnn", backbone="resnet18", num_classes=4, fpn_channels=16, representation_size=32,
        mask_channels=8, mask_dim_reduced=8), batch["image"][:1], scale=None)
    full, full_shape, positives = losses(None)
    assert full_shape[1] == 16 and 1 < positives.max() < 16, positives
    same, same_shape, _ = losses(int(positives.max()))
    assert same_shape[1] == positives.max()
    for k in full:
        np.testing.assert_allclose(same[k], full[k], rtol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="positive_rois_per_image"):
        fb.create_model("maskrcnn", backbone="resnet18", positive_rois_per_image=0)
