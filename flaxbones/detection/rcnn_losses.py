"""torchvision's R-CNN training losses (RPN and Fast R-CNN) on fixed-size arrays with masks:
sums over the sampled entries divided by their count, as torchvision's mean over the
concatenated per-image samples."""
import jax
import jax.numpy as jnp


def smooth_l1(x, y, beta: float = 1.0 / 9):
    """torch's F.smooth_l1_loss(x, y, beta, reduction='none')."""
    diff = jnp.abs(x - y)
    return jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)


def bce_with_logits(logits, targets):
    """torch's F.binary_cross_entropy_with_logits(reduction='none')."""
    return (1.0 - targets) * logits - jax.nn.log_sigmoid(logits)


def _safe(targets, positive):
    """Regression targets with the non-positive rows zeroed (theirs may be inf or NaN, and a
    NaN would poison the gradient of the masked sum)."""
    return jnp.where(positive[..., None], targets, 0.0)


def rpn_loss(objectness, deltas, labels, regression_targets, positive, negative):
    """RegionProposalNetwork.compute_loss: objectness (N, A) logits, deltas (N, A, 4), labels
    (N, A) (1 / 0), regression targets (N, A, 4), sampled positive / negative (N, A) bool ->
    (loss_objectness, loss_rpn_box_reg)."""
    sampled = positive | negative
    count = jnp.maximum(sampled.sum(), 1).astype(jnp.float32)
    objectness = objectness.astype(jnp.float32)
    bce = bce_with_logits(objectness, (labels >= 1).astype(jnp.float32))
    box = smooth_l1(deltas.astype(jnp.float32), _safe(regression_targets, positive))
    return (jnp.where(sampled, bce, 0.0).sum() / count,
            jnp.where(positive[..., None], box, 0.0).sum() / count)


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets, sampled):
    """torchvision's fastrcnn_loss: class_logits (N, R, C), box_regression (N, R, 4C), labels
    (N, R) int (> 0 positive), regression targets (N, R, 4), sampled (N, R) bool ->
    (loss_classifier, loss_box_reg)."""
    n, r, c = class_logits.shape
    count = jnp.maximum(sampled.sum(), 1).astype(jnp.float32)
    labels = jnp.where(sampled, labels, 0)
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    positive = sampled & (labels > 0)
    regression = box_regression.astype(jnp.float32).reshape(n, r, c, 4)
    regression = jnp.take_along_axis(regression, labels[..., None, None], 2)[:, :, 0]
    box = smooth_l1(regression, _safe(regression_targets, positive))
    return (jnp.where(sampled, nll, 0.0).sum() / count,
            jnp.where(positive[..., None], box, 0.0).sum() / count)
