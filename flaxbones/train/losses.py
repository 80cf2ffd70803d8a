"""Losses as (sum, count) over the global batch, so padded examples and ignored pixels
drop out exactly and any split (devices, hosts, micro-batches) sums to the same mean."""
import jax
import jax.numpy as jnp
import optax


def example_mask(batch, n: int):
    """The batch's `valid` flags (padded examples are 0/False) as 0/1, or all ones."""
    mask = batch.get("valid") if isinstance(batch, dict) else None
    return jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                          mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of (N, C) logits against (N,) integer labels, with label smoothing.

    Targets are (1 - a) one-hot + a / C; computed in float32.

    Args:
        logits: (N, C) float logits.
        labels: (N,) int class ids.
        label_smoothing: The smoothing a.
        mask: (N,) 0/1 or bool weights (padded examples 0); None counts every example.

    Returns:
        (sum over unmasked examples, their count), float32 scalars.

    Raises:
        ValueError: The logits are not (N, C) or the labels not (N,).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification needs logits (N, C) and labels (N,); got logits "
                         f"{logits.shape} and labels {labels.shape}")
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def pixel_weights(labels, ignore_label: int = 255, mask=None):
    """1 for labelled pixels of unpadded examples, 0 for `ignore_label` or padding."""
    w = (labels != ignore_label).astype(jnp.float32)
    if mask is not None:
        w = w * mask.astype(jnp.float32).reshape((-1,) + (1,) * (labels.ndim - 1))
    return w


def _pixel_ce(logits, labels, weights):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"segmentation logits {logits.shape} do not match labels "
                         f"{labels.shape} (need (N, H, W, C) and (N, H, W))")
    logits = logits.astype(jnp.float32)
    safe = jnp.where(weights > 0, labels, 0)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, safe) * weights)


def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255,
                               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-pixel cross-entropy of (N, H, W, C) logits against (N, H, W) labels.

    Pixels labelled `ignore_label` and padded examples are left out; computed in float32.

    Args:
        logits: (N, H, W, C) float logits.
        labels: (N, H, W) int class ids.
        ignore_label: The label of pixels to leave out.
        mask: (N,) 0/1 or bool example weights (padded examples 0); None: all count.

    Returns:
        (sum, number of counted pixels), float32 scalars.

    Raises:
        ValueError: The logits do not match the labels' (N, H, W).
    """
    weights = pixel_weights(labels, ignore_label, mask)
    return _pixel_ce(logits, labels, weights), jnp.sum(weights)
