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


def test_segmentation_loss_accepts_plain_logits_and_checks_shapes():
    outputs, batch = seg_batch(2)
    s_dict, n = train.segmentation_cross_entropy(outputs, batch["segmentation"], aux_weight=0.0)
    s_plain, _ = train.segmentation_cross_entropy(outputs["out"], batch["segmentation"])
    assert float(s_dict) == pytest.approx(float(s_plain)) and float(n) > 0
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
    ref = np.zeros((4, 4), np.int64)
    np.add.at(ref, (batch["segmentation"][valid], preds[valid]), 1)
    np.testing.assert_array_equal(np.asarray(metrics["confusion"]), ref)
    assert int(metrics["count"]) == valid.sum()
