"""Optimizer factory over optax: SGD/Nesterov, AdamW, LAMB; warmup + cosine/step
schedules; weight decay off BatchNorm and biases; backbone vs head learning rates."""
from typing import Sequence

import jax
import optax


def make_schedule(learning_rate: float, schedule: str = "cosine", *, warmup_steps: int = 0,
                  total_steps: int | None = None, boundaries: Sequence[int] = (),
                  decay_factor: float = 0.1, end_value: float = 0.0) -> optax.Schedule:
    """'constant', 'cosine' (to `end_value` at `total_steps`) or 'step' (x `decay_factor`
    at each of `boundaries`, absolute steps), after a linear warmup from 0."""
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  max(total_steps, warmup_steps + 1), end_value)
    if schedule == "step":
        main = optax.piecewise_constant_schedule(
            learning_rate, {b - warmup_steps: decay_factor for b in boundaries if b > warmup_steps})
    elif schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'cosine' or 'step'")
    if not warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params):
    """True where weight decay applies: kernels (rank >= 2), not BN scales/shifts or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def backbone_labels(params):
    """'backbone' for the top-level `backbone` sub-tree, 'head' for everything else."""
    return {k: jax.tree.map(lambda _: "backbone" if k == "backbone" else "head", v)
            for k, v in params.items()}


def make_optimizer(name: str = "sgd", learning_rate=0.1, *, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, clip_norm: float | None = None,
                   backbone_lr_mult: float = 1.0, freeze_backbone: bool = False,
                   **schedule_kwargs) -> optax.GradientTransformation:
    """An optax transformation. `learning_rate` is a float or schedule; with any of
    `schedule`, `warmup_steps`, `total_steps`, `boundaries` it is the peak of
    `make_schedule`. SGD decays weights as torch does (L2 added to the gradient before
    momentum); AdamW and LAMB decouple it. `backbone_lr_mult` scales (and
    `freeze_backbone` zeroes) the updates of params['backbone']; `clip_norm` clips the
    global gradient norm first."""
    lr = make_schedule(learning_rate, **schedule_kwargs) if schedule_kwargs else learning_rate
    if name == "sgd":
        base = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.sgd(lr, momentum or None, nesterov))
    elif name == "adamw":
        base = optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "lamb":
        base = optax.lamb(lr, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'sgd', 'adamw' or 'lamb'")
    if freeze_backbone or backbone_lr_mult != 1.0:
        backbone = (optax.set_to_zero() if freeze_backbone
                    else optax.chain(base, optax.scale(backbone_lr_mult)))
        base = optax.multi_transform({"backbone": backbone, "head": base}, backbone_labels)
    return optax.chain(optax.clip_by_global_norm(clip_norm), base) if clip_norm else base
