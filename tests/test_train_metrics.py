"""Losses and metrics against independent numpy computations, with ignore pixels and
padded examples; sums accumulated over batches equal one pass over everything."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbones import train


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def seg_batch(seed, n=3, h=5, w=7, c=4):
    rs = np.random.RandomState(seed)
    out = rs.randn(n, h, w, c).astype(np.float32)
    aux = rs.randn(n, h, w, c).astype(np.float32)
    label = rs.randint(0, c, (n, h, w)).astype(np.int32)
    label[rs.rand(n, h, w) < 0.2] = 255
    mask = np.ones(n, np.float32)
    mask[-1] = 0
    return {"out": out, "aux": aux}, {"image": np.zeros((n, h, w, 3), np.float32),
                                      "segmentation": label, "valid": mask}


@pytest.fixture(scope="module")
def seg_sums():
    task = train.Segmentation(num_classes=4, aux_weight=0.4)

    @jax.jit
    def sums(outputs, batch):
        task.check(batch)
        loss_sum, count = task.loss(outputs, batch)
        return {"loss_sum": loss_sum, "count": count, **task.metrics(outputs, batch)}
    return sums


def numpy_seg(batches, c=4):
    """mIoU, pixel accuracy and loss over every valid pixel of every batch."""
    preds, labels, nll = [], [], []
    for outputs, batch in batches:
        valid = (batch["segmentation"] != 255) & (batch["valid"][:, None, None] > 0)
        lab = batch["segmentation"][valid]
        preds.append(outputs["out"].argmax(-1)[valid])
        labels.append(lab)
        for key, weight in (("out", 1.0), ("aux", 0.4)):
            lp = log_softmax(outputs[key].astype(np.float64))[valid]
            nll.append(-weight * lp[np.arange(len(lab)), lab])
    pred, lab = np.concatenate(preds), np.concatenate(labels)
    ious = []
    for k in range(c):
        tp = np.sum((pred == k) & (lab == k))
        union = np.sum((pred == k) | (lab == k))
        if union:
            ious.append(tp / union)
    return {"miou": np.mean(ious), "pixel_accuracy": np.mean(pred == lab),
            "loss": np.concatenate(nll).sum() / len(lab)}


def test_segmentation_metrics_match_numpy(seg_sums):
    batches = [seg_batch(0), seg_batch(1)]
    parts = [jax.device_get(seg_sums(*b)) for b in batches]
    total = jax.tree.map(lambda a, b: a + b, *parts)
    for got, ref in ((train.summarize(parts[0]), numpy_seg(batches[:1])),
                     (train.summarize(total), numpy_seg(batches))):
        for k in ("miou", "pixel_accuracy", "loss"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    # padded example and ignore pixels contribute nothing
    assert int(parts[0]["confusion"].sum()) == int(parts[0]["count"])


def test_segmentation_loss_checks_shapes():
    outputs, batch = seg_batch(2)
    _, n = train.segmentation_cross_entropy(outputs["out"], batch["segmentation"])
    assert float(n) == np.sum(batch["segmentation"] != 255)
    with pytest.raises(ValueError, match="do not match labels"):
        train.segmentation_cross_entropy(outputs["out"][:, :4], batch["segmentation"])


def test_topk_and_smoothed_cross_entropy_match_numpy():
    rs = np.random.RandomState(0)
    logits = rs.randn(9, 10).astype(np.float32)
    labels = rs.randint(0, 10, 9).astype(np.int32)
    mask = (rs.rand(9) > 0.3).astype(np.float32)
    got = jax.jit(train.topk_correct, static_argnums=2)(logits, labels, (1, 5), mask)
    order = np.argsort(-logits, -1)
    for k in (1, 5):
        ref = sum(mask[i] * (labels[i] in order[i, :k]) for i in range(9))
        assert float(got[f"top{k}"]) == pytest.approx(ref)
    s, n = train.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1, mask)
    target = np.full((9, 10), 0.1 / 10)
    target[np.arange(9), labels] += 0.9
    ref = (-(target * log_softmax(logits.astype(np.float64))).sum(-1) * mask).sum()
    assert float(s) == pytest.approx(ref, rel=1e-5) and float(n) == mask.sum()
    with pytest.raises(ValueError, match="labels"):
        train.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:5]))


def test_confusion_matrix_accumulated_inside_the_train_step():
    """A segmenter's {'out', 'aux'} through a real train step: the step's confusion matrix
    (forward pass before the update) equals numpy's on the same predictions."""
    from flax import linen as nn

    class TinySegmenter(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return {"out": nn.Conv(4, (3, 3), name="head")(x),
                    "aux": nn.Conv(4, (1, 1), name="aux")(x)}

    mesh = train.make_mesh()
    _, batch = seg_batch(4)
    batch["image"] = np.random.RandomState(5).randn(*batch["image"].shape).astype(np.float32)
    state = train.create_train_state(TinySegmenter(), train.make_optimizer("sgd", 0.1),
                                     jax.random.PRNGKey(0), (1, 5, 7, 3), mesh)
    preds = np.asarray(state.apply_fn(state.variables, batch["image"])["out"]).argmax(-1)
    step = train.make_train_step(train.Segmentation(num_classes=4), mesh,
                                 jax.tree.map(lambda a: a.sharding, state))
    _, metrics = step(state, batch)
    valid = (batch["segmentation"] != 255) & (batch["valid"][:, None, None] > 0)
    ref = np.zeros((4, 5), np.int64)  # last column: no valid prediction (none here)
    np.add.at(ref, (batch["segmentation"][valid], preds[valid]), 1)
    np.testing.assert_array_equal(np.asarray(metrics["confusion"]), ref)
    assert int(metrics["count"]) == valid.sum()


def numpy_topk(logits, labels, k):
    """Within top-k: no NaN in the row, a finite label logit, and fewer than k other classes
    with a logit >= it (ties count against)."""
    out = []
    for row, label in zip(logits, labels):
        others = np.delete(row, label)
        out.append(not np.isnan(row).any() and np.isfinite(row[label])
                   and np.sum(others >= row[label]) < k)
    return np.array(out)


def awkward_logits():
    """Rows: normal, all NaN, one NaN, label +inf, label -inf, another class +inf, the label
    tied for first, all equal, a second class tied at the label's rank 3."""
    rs = np.random.RandomState(1)
    logits = rs.randn(9, 6).astype(np.float32)
    labels = np.array([2, 0, 1, 3, 4, 5, 0, 1, 2], np.int32)
    logits[0, 2] = 3.0
    logits[1] = np.nan
    logits[2, 4] = np.nan
    logits[3, 3] = np.inf
    logits[4, 4] = -np.inf
    logits[5, 0] = np.inf
    logits[6, 0] = logits[6, 3] = logits[6].max() + 1
    logits[7] = 0.5
    logits[8] = [5, 4, 3, 3, 1, 0]
    return logits, labels


def test_topk_counts_nan_inf_and_ties_as_wrong():
    logits, labels = awkward_logits()
    got = jax.jit(train.topk_correct, static_argnums=2)(logits, labels, (1, 2, 3, 4))
    for k in (1, 2, 3, 4):
        ref = numpy_topk(logits, labels, k)
        assert float(got[f"top{k}"]) == ref.sum(), (k, ref)
    assert not numpy_topk(logits, labels, 6)[[1, 2, 3, 4]].any()  # never right, whatever k


def test_predictions_and_confusion_count_nonfinite_logits_as_misses():
    rs = np.random.RandomState(2)
    c = 4
    logits = rs.randn(2, 5, 6, c).astype(np.float32)
    labels = rs.randint(0, c, (2, 5, 6)).astype(np.int32)
    logits[0, 0, :3] = np.nan
    logits[0, 1, :2, 1] = np.inf
    logits[1, 2, :4] = -np.inf
    weights = (rs.rand(2, 5, 6) > 0.1).astype(np.float32)
    preds = np.asarray(train.predictions(jnp.asarray(logits)))
    bad = ~np.isfinite(logits).all(-1)
    assert preds.dtype == np.int32 and bad.sum() == 9
    np.testing.assert_array_equal(preds, np.where(bad, -1, logits.argmax(-1)))
    cm = jax.jit(train.confusion_matrix, static_argnums=2)(preds, labels, c, weights)
    got = train.segmentation_scores(cm)
    valid = weights > 0
    p, lab = preds[valid], labels[valid]
    assert int(np.asarray(cm).sum()) == valid.sum()
    ious = [np.sum((p == k) & (lab == k)) / np.sum((p == k) | (lab == k)) for k in range(c)]
    np.testing.assert_allclose(got["iou"], ious, rtol=1e-6)
    assert got["miou"] == pytest.approx(np.mean(ious))
    assert got["pixel_accuracy"] == pytest.approx(np.mean(p == lab))
    # all pixels diverged: nothing is right, no class is predicted
    nan_cm = train.confusion_matrix(train.predictions(jnp.full((2, 3, 3, c), jnp.nan)),
                                    jnp.zeros((2, 3, 3), jnp.int32), c, jnp.ones((2, 3, 3)))
    scores = train.segmentation_scores(nan_cm)
    assert scores["pixel_accuracy"] == 0 and scores["miou"] == 0 and scores["iou"][0] == 0
