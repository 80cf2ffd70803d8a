"""Optimizer factory over optax: SGD/Nesterov, AdamW, LAMB; warmup + cosine/step
schedules; weight decay on kernels only; backbone vs head learning rates.

Rules go by leaf *name*, so scanned (stacked, `flaxbones.scan`) and unrolled trees take
the same updates. An option that would not act raises instead of being dropped."""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from flaxbones.scan import is_stacked
from flaxbones.train.sharding import path_str

# Options that only some optimizers / schedules read.
OPTIMIZER_OPTIONS = {"sgd": ("momentum", "nesterov"), "adamw": ("b1", "b2", "eps"),
                     "lamb": ("b1", "b2", "eps")}
SCHEDULE_OPTIONS = {"constant": (), "cosine": ("total_steps", "end_value"),
                    "step": ("boundaries", "decay_factor")}


def _reject_unused(kind: str, name: str, used: Sequence[str], **options):
    given = [k for k, v in options.items() if v is not None and k not in used]
    if given:
        reads = f"; it reads {', '.join(used)}" if used else ""
        raise ValueError(f"{given[0]} does not apply to the {name!r} {kind}{reads}")


def make_schedule(learning_rate: float, schedule: str = "cosine", *, warmup_steps: int = 0,
                  total_steps: int | None = None, boundaries: Sequence[int] | None = None,
                  decay_factor: float | None = None,
                  end_value: float | None = None) -> optax.Schedule:
    """A learning-rate schedule: a linear warmup from 0, then constant, cosine or step.

    Options of another schedule raise rather than being dropped.

    Args:
        learning_rate: The peak learning rate (a float).
        schedule: 'constant', 'cosine' (to `end_value` at `total_steps`) or 'step'
            (x `decay_factor` at each of `boundaries`).
        warmup_steps: Steps of linear warmup from 0 to `learning_rate`.
        total_steps: The cosine schedule's last step (warmup included).
        boundaries: The step schedule's decay steps (absolute, warmup included).
        decay_factor: The step schedule's factor per boundary (default 0.1).
        end_value: The cosine schedule's final value (default 0).

    Returns:
        An `optax.Schedule` (step -> learning rate).

    Raises:
        ValueError: An unknown `schedule`, an option it does not read, a callable
            `learning_rate`, cosine without `total_steps` or step without `boundaries`.
    """
    if schedule not in SCHEDULE_OPTIONS:
        raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'cosine' or 'step'")
    _reject_unused("schedule", schedule, SCHEDULE_OPTIONS[schedule], total_steps=total_steps,
                   end_value=end_value, boundaries=boundaries, decay_factor=decay_factor)
    if callable(learning_rate):
        raise ValueError("learning_rate is already a schedule; pass a float peak with "
                         "schedule options, or the schedule alone")
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  max(total_steps, warmup_steps + 1),
                                                  end_value or 0.0)
    if schedule == "step":
        if not boundaries:
            raise ValueError("the step schedule needs boundaries")
        factor = 0.1 if decay_factor is None else decay_factor
        main = optax.piecewise_constant_schedule(
            learning_rate, {b - warmup_steps: factor for b in boundaries if b > warmup_steps})
    else:
        main = optax.constant_schedule(learning_rate)
    if not warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: leaves named `kernel` (conv and dense), any rank.

    Not BatchNorm scales and biases, nor biases.

    Args:
        params: A params tree.

    Returns:
        A tree of bools of the same structure (optax's `mask`).
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p[-1:]) == "kernel", params)


def scale_by_trust_ratio() -> optax.GradientTransformation:
    """optax.scale_by_trust_ratio (LAMB's ||param|| / ||update|| per leaf), per block for
    leaves stacked by scan: each block keeps the ratio it has unrolled."""
    def scale(path, u, p):
        axes = tuple(range(1 if is_stacked(path_str(path)) else 0, u.ndim))
        p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axes, keepdims=True))
        u_norm = jnp.sqrt(jnp.sum(jnp.square(u), axes, keepdims=True))
        return u * jnp.where((p_norm == 0) | (u_norm == 0), 1.0, p_norm / u_norm).astype(u.dtype)

    def update(updates, state, params):
        return jax.tree_util.tree_map_with_path(scale, updates, params), state
    return optax.GradientTransformation(optax.init_empty_state, update)


def backbone_labels(params):
    """'backbone' for the top-level `backbone` sub-tree, 'head' for everything else."""
    if "backbone" not in params:
        raise ValueError(f"backbone_lr_mult / freeze_backbone need a top-level 'backbone' in "
                         f"the params; they have {sorted(params)}")
    return {k: jax.tree.map(lambda _: "backbone" if k == "backbone" else "head", v)
            for k, v in params.items()}


def make_optimizer(name: str = "sgd", learning_rate: float | optax.Schedule = 0.1, *,
                   momentum: float | None = None,
                   nesterov: bool | None = None, weight_decay: float = 0.0,
                   b1: float | None = None, b2: float | None = None, eps: float | None = None,
                   clip_norm: float | None = None, backbone_lr_mult: float = 1.0,
                   freeze_backbone: bool = False,
                   **schedule_kwargs: Any) -> optax.GradientTransformation:
    """An optax optimizer: SGD (Nesterov), AdamW or LAMB, with decay, clipping and LR splits.

    SGD decays weights as torch does (L2 added to the gradient before momentum); AdamW
    and LAMB decouple the decay. Weight decay applies to kernels only (`decay_mask`).
    Rules go by leaf name, so scanned and unrolled trees take the same updates. An
    option given to an optimizer that does not read it raises ValueError.

    Args:
        name: 'sgd', 'adamw' or 'lamb'.
        learning_rate: A float or an optax schedule; with any schedule keyword it is the
            peak of `make_schedule`.
        momentum: SGD's momentum (default 0.9).
        nesterov: SGD's Nesterov momentum (default False).
        weight_decay: The decay coefficient (0: none).
        b1: Adam's first-moment decay (AdamW, LAMB; default 0.9).
        b2: Adam's second-moment decay (default 0.999).
        eps: Adam's epsilon (default 1e-8).
        clip_norm: Clip the global gradient norm to this first; None: no clipping.
        backbone_lr_mult: Scale the updates of params['backbone'] by this.
        freeze_backbone: Zero the updates of params['backbone'].
        **schedule_kwargs: `make_schedule`'s options (`schedule`, `warmup_steps`,
            `total_steps`, `boundaries`, `decay_factor`, `end_value`).

    Returns:
        The `optax.GradientTransformation`.

    Raises:
        ValueError: An unknown `name`, an option it does not read, `nesterov` without
            momentum, `freeze_backbone` with a `backbone_lr_mult`, a schedule error
            (`make_schedule`), or (at init) a `backbone_lr_mult` / `freeze_backbone` on
            params without a top-level 'backbone'.
    """
    if name not in OPTIMIZER_OPTIONS:
        raise ValueError(f"unknown optimizer {name!r}; use 'sgd', 'adamw' or 'lamb'")
    _reject_unused("optimizer", name, OPTIMIZER_OPTIONS[name], momentum=momentum,
                   nesterov=nesterov, b1=b1, b2=b2, eps=eps)
    if freeze_backbone and backbone_lr_mult != 1.0:
        raise ValueError("freeze_backbone zeroes the backbone's updates; backbone_lr_mult "
                         f"={backbone_lr_mult} would not act")
    lr = make_schedule(learning_rate, **schedule_kwargs) if schedule_kwargs else learning_rate
    b1, b2, eps = (d if v is None else v for v, d in ((b1, 0.9), (b2, 0.999), (eps, 1e-8)))
    if name == "sgd":
        momentum = 0.9 if momentum is None else momentum
        if nesterov and not momentum:
            raise ValueError("nesterov=True needs momentum > 0")
        base = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.sgd(lr, momentum or None, bool(nesterov)))
    elif name == "adamw":
        base = optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    else:
        base = optax.chain(optax.scale_by_adam(b1, b2, eps),
                           optax.add_decayed_weights(weight_decay, decay_mask),
                           scale_by_trust_ratio(), optax.scale_by_learning_rate(lr))
    if freeze_backbone or backbone_lr_mult != 1.0:
        backbone = (optax.set_to_zero() if freeze_backbone
                    else optax.chain(base, optax.scale(backbone_lr_mult)))
        base = optax.multi_transform({"backbone": backbone, "head": base}, backbone_labels)
    return optax.chain(optax.clip_by_global_norm(clip_norm), base) if clip_norm else base
