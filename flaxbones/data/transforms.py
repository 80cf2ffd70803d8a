"""Per-example image (and mask) transforms in tf.data, with stateless per-example seeds.

Every random transform takes `seed`, an int64 tensor of shape (2,), so a pipeline
is reproducible from one integer however its map calls are parallelised.
Masks are (H, W, 1) integer tensors; they are resized nearest-neighbour and padded
with the ignore label.
"""
import tensorflow as tf


def normalize(image, mean, std):
    """uint8 [0, 255] -> float32 (x / 255 - mean) / std, mean/std on the [0, 1] scale."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_resized_crop(image, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: a random box of `scale` area and `ratio` aspect, resized to size."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    return tf.image.resize(image, (size, size), antialias=True)


def resize_center_crop(image, size, crop_fraction=0.875):
    """Resize the shorter side to size / crop_fraction, then take the central size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.cast(tf.round(size / crop_fraction), tf.float32)
    new = tf.cast(tf.round(shape * short / tf.reduce_min(shape)), tf.int32)
    new = tf.maximum(new, size)
    image = tf.image.resize(image, new, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[top:top + size, left:left + size]


def random_flip(seed, *images):
    """Flip all `images` left-right together with probability 1/2."""
    flip = tf.random.stateless_uniform((), seed) < 0.5
    return tuple(tf.cond(flip, lambda x=x: tf.reverse(x, [1]), lambda x=x: x) for x in images)


def random_scale(image, mask, seed, scale_range=(0.5, 2.0)):
    """Rescale image (bilinear) and mask (nearest) by one factor drawn from scale_range."""
    factor = tf.random.stateless_uniform((), seed, *scale_range)
    hw = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * factor), tf.int32)
    hw = tf.maximum(hw, 1)
    image = tf.image.resize(image, hw)
    mask = tf.image.resize(mask, hw, method="nearest")
    return image, mask


def pad_to_at_least(image, mask, size, ignore_label):
    """Pad bottom/right to at least `size` (h, w): image with 0, mask with ignore_label."""
    hw = tf.shape(image)[:2]
    pad_h, pad_w = tf.maximum(size[0] - hw[0], 0), tf.maximum(size[1] - hw[1], 0)
    paddings = [[0, pad_h], [0, pad_w], [0, 0]]
    image = tf.pad(image, paddings)
    mask = tf.pad(mask, paddings, constant_values=tf.cast(ignore_label, mask.dtype))
    return image, mask


def random_crop(image, mask, size, seed):
    """The same random `size` (h, w) window of image and mask (both at least that large)."""
    hw = tf.shape(image)[:2]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    top = tf.random.stateless_uniform((), seeds[0], 0, hw[0] - size[0] + 1, tf.int32)
    left = tf.random.stateless_uniform((), seeds[1], 0, hw[1] - size[1] + 1, tf.int32)
    return (image[top:top + size[0], left:left + size[1]],
            mask[top:top + size[0], left:left + size[1]])


def fit_and_pad(image, mask, size, ignore_label):
    """Eval: shrink (never enlarge) to fit in `size` keeping aspect, then pad to exactly size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = tf.minimum(1.0, tf.reduce_min(tf.constant(size, tf.float32) / shape))
    hw = tf.cast(tf.round(shape * factor), tf.int32)
    image = tf.image.resize(image, hw, antialias=True)
    mask = tf.image.resize(mask, hw, method="nearest")
    image, mask = pad_to_at_least(image, mask, size, ignore_label)
    return tf.ensure_shape(image, (*size, None)), tf.ensure_shape(mask, (*size, None))


def map_labels(mask, table, ignore_label):
    """Relabel a uint8 mask through `table` (raw value -> class); values past it -> ignore."""
    table = list(table) + [ignore_label] * (256 - len(table))
    return tf.gather(tf.constant(table, tf.int32), tf.cast(mask, tf.int32))
