"""The torchvision / timm model whose state dict a flaxbones model's weights fill, and that
state dict made from flax variables (`save_weights(..., layout="torch")`)."""
import contextlib
import re
from functools import partial

import numpy as np
from flax import traverse_util

from flaxbones.registry import create_model, get_spec
from flaxbones.weights.convert import DROP, _index_modules, _leaf, _listing, _to_torch_layout, \
    map_module_path

# flaxbones names whose reference has another name or fixed options: (its name, its kwargs).
_REFERENCES = {"mobilenet_v1": ("mobilenetv1_100", {}), "xception": ("legacy_xception", {}),
               **{f"mobilenet_v2_{w}": ("mobilenet_v2", {"width_mult": int(w) / 100})
                  for w in ("050", "075", "140")}}
# create_model keywords that leave the reference's state dict alone: dtypes, memory and
# kernel choices, dilation, training-only settings (dropout, BN momentum, frozen layers or
# BN, sampling) and detectors' inference thresholds. The head ones are passed on to it.
_NEUTRAL = re.compile(
    r"num_classes|aux_loss|aux_logits|transform_input|num_keypoints|dtype|param_dtype|"
    r"scan_blocks|remat|cpu_kernels|axis_name|output_stride|frozen_bn|drop_rate|aux_drop_rate|"
    r"drop_path_rate|bn_momentum|trainable_layers|roi_align|positive_rois_per_image|"
    r"detections_per_img|topk_candidates|score_thresh|nms_thresh|center_sampling_radius|"
    r"bbox_loss|(rpn|box)_\w*(thresh|top_n|top_n_train|batch_size_per_image|positive_fraction)")


def _torch():
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as e:
        raise ImportError("the torch layout needs torch and torchvision (and timm for timm's "
                          "models): pip install 'flaxbones[torch]'") from e
    return torch


def reference_name(name: str) -> tuple[str, str]:
    """(library, its name) of the reference model of flaxbones' `name`: ('torchvision',
    'resnet50'), ('timm', 'mobilenetv1_100'); a ValueError where there is none."""
    source = get_spec(name).weights
    if source is None or source.name not in ("torchvision", "timm"):
        raise ValueError(f"{name!r} has no torchvision or timm reference model; save it with "
                         "layout='flax'")
    return source.name, _REFERENCES.get(name, (name,))[0]


@contextlib.contextmanager
def _parameters_on_meta():
    """Every nn.Parameter made inside goes to the meta device (no memory, no init cost);
    buffers stay real, so constants computed at construction (Swin's
    relative_position_index) keep their values. Not thread-safe: it patches nn.Module."""
    torch = _torch()
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), param.requires_grad)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def check_reference_kwargs(model_kwargs: dict):
    """A ValueError for create_model keywords the reference model cannot express."""
    odd = sorted(k for k in model_kwargs if not _NEUTRAL.fullmatch(k))
    if odd:
        raise ValueError(f"the torch reference cannot express model_kwargs {odd} (they change "
                         "the network); save this model with layout='flax'")


def torch_reference(name: str, *, meta: bool = False, **model_kwargs):
    """The torchvision / timm model (eval mode, random weights) whose state dict the
    variables of `create_model(name, **model_kwargs)` fill: the same classes, aux heads
    and input transform; a detector's backbone with FrozenBatchNorm2d (and its epsilon)
    where flaxbones freezes it, as torchvision builds its COCO models. With `meta=True`
    the parameters are on the meta device (instant, no memory): fill them with
    `load_state_dict(state, assign=True)`. Dilation (`output_stride`) is not reproduced."""
    _torch()
    check_reference_kwargs(model_kwargs)
    model = create_model(name, **model_kwargs)
    library, ref_name = reference_name(name)
    spec = get_spec(name)
    kwargs = {"num_classes": model_kwargs.get("num_classes", spec.weights.num_classes),
              **_REFERENCES.get(name, (name, {}))[1]}
    aux = getattr(model, "aux_head", None) is not None
    if library == "timm":
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"{name!r}'s reference is timm's {ref_name!r}: "
                              "pip install timm") from e
        build = partial(timm.create_model, ref_name, pretrained=False)
    else:
        import torchvision
        build = partial(torchvision.models.get_model, ref_name, weights=None)
        if spec.family == "segmenter":
            kwargs.update(weights_backbone=None, aux_loss=aux)
        elif spec.family == "detector":
            kwargs.update(weights_backbone=None)
            if "num_keypoints" in model_kwargs:
                kwargs["num_keypoints"] = model_kwargs["num_keypoints"]
        elif name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=aux, init_weights=True,
                          transform_input=model.backbone.transform_input)
    try:
        with _parameters_on_meta() if meta else contextlib.nullcontext():
            ref = build(**kwargs)
    except (RuntimeError, NotImplementedError):  # an init that mixes meta and real tensors
        if not meta:
            raise
        ref = build(**kwargs)
    if spec.family == "detector" and getattr(model.backbone, "frozen_bn", False):
        _freeze(ref.backbone.body, model.backbone.bn_epsilon)
    return ref.eval()


def _freeze(module, eps: float):
    """BatchNorm2d -> FrozenBatchNorm2d below `module` (what torchvision does for weights)."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d
    for child_name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, child_name, FrozenBatchNorm2d(child.num_features, eps=eps))
        else:
            _freeze(child, eps)


def torch_state_dict(variables, name: str, **model_kwargs) -> dict[str, np.ndarray]:
    """The state dict of `torch_reference(name, **model_kwargs)` holding `variables` (of
    `create_model(name, **model_kwargs)`, scanned or not): its keys, layouts (OIHW
    kernels, (out, in) linears, packed attention projections, (C, 1, 1) layer scales) and
    dtypes; `num_batches_tracked` as int64 zeros, constant buffers (Swin's relative
    position index) as the reference computes them. Every key must be filled and every
    variable used, else a ValueError listing the first offenders."""
    torch = _torch()
    if model_kwargs.get("scan_blocks"):
        from flaxbones.scan import unscan_variables
        variables = unscan_variables(variables, create_model(name, **model_kwargs))
    reference = torch_reference(name, meta=True, **model_kwargs)
    rules = get_spec(name).weights.rules
    dropped = [pattern for pattern, template in rules if template == DROP]
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    modules = _index_modules(flat)
    out, used, missing, mismatched = {}, {}, [], []
    for key, tensor in reference.state_dict().items():
        shape, dtype = tuple(tensor.shape), torch.empty((), dtype=tensor.dtype).numpy().dtype
        module, _, torch_leaf = key.rpartition(".")
        if torch_leaf == "num_batches_tracked":
            out[key] = np.zeros(shape, np.int64)
            continue
        if any(re.fullmatch(p, key) for p in dropped):
            out[key] = tensor.numpy().copy()  # a buffer: real even on a meta reference
            continue
        path = map_module_path(module, rules)
        leaf = _leaf(torch_leaf, modules[path]) if path in modules else None
        flax_key = leaf and f"{leaf[0]}/{path}/{leaf[1]}"
        if flax_key not in flat:
            missing.append(f"{key} {shape}" + (f" (from {flax_key})" if flax_key else ""))
            continue
        if flax_key in used:
            raise ValueError(f"{used[flax_key]!r} and {key!r} both map onto {flax_key}")
        used[flax_key] = key
        value = _to_torch_layout(np.asarray(flat[flax_key]), leaf[1], shape)
        if value.shape != shape:
            mismatched.append(f"{flax_key} {np.shape(flat[flax_key])} -> {key} {shape}")
            continue
        out[key] = np.ascontiguousarray(value, dtype=dtype)
    unused = [k for k in flat if k not in used]
    if missing or unused or mismatched:
        given = f" (model_kwargs {model_kwargs})" if model_kwargs else ""
        raise ValueError(
            f"the variables do not fill the state dict of {name!r}'s reference model{given}:\n"
            + "\n".join(_listing(title, items) for title, items in (
                ("reference keys without a variable", missing), ("variables unused", unused),
                ("shape mismatch", mismatched)) if items))
    return out
