"""Train and evaluate a flaxbones model from an ml_collections config.

    python experiments/train.py --config=experiments/configs/demo.py --workdir=workdir/demo
    python experiments/train.py --config=experiments/configs/cifar10_resnet18.py \
        --config.batch_size=256 --config.data_dir=~/tensorflow_datasets --workdir=workdir/c10

The workdir holds Orbax checkpoints (checkpoints/), TensorBoard summaries (tensorboard/),
a JSON-lines metrics log (metrics.jsonl) and pictures (pictures/). Started again on the
same workdir, a run resumes from its latest checkpoint and continues exactly; SIGTERM
checkpoints the current step and exits.
"""
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "configs")]  # pictures.py; configs import `common`
import pictures  # noqa: E402
from common import pair  # noqa: E402

import flaxbones as fb  # noqa: E402
import flaxbones.data as fbd  # noqa: E402
from flaxbones import train as ft  # noqa: E402
from flaxbones.train.checkpoint import (Checkpoints, PreemptionGuard, abstract_state_like,  # noqa: E402
                                        transfer)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run (train.initialize) before touching devices: "
    "the cluster is detected (TPU pods, SLURM, ...) unless the three flags below say it.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 first.")


def build_model(config):
    policy = ft.Policy.named(config.precision)
    model = fb.create_model(config.model, num_classes=config.num_classes,
                            **policy.model_kwargs(), **config.model_kwargs.to_dict())
    return model, policy


def build_task(config):
    if config.task == "detection":
        return ft.Detection(loss_weights=tuple(config.detection.loss_weights.items()))
    if config.task == "segmentation":
        return ft.Segmentation(config.num_classes, aux_weight=config.aux_weight)
    if config.task == "classification":
        return ft.Classification(label_smoothing=config.label_smoothing)
    raise ValueError(f"config.task must be 'classification', 'segmentation' or 'detection', "
                     f"got {config.task!r}")


def build_optimizer(config):
    """config.optimizer as it is, a cosine schedule decaying over config.num_steps."""
    options = config.optimizer.to_dict()
    if options.get("schedule") == "cosine":
        options.setdefault("total_steps", config.num_steps)
    return ft.make_optimizer(**options)


def build_data(config, mesh, train: bool, start_batch: int = 0):
    """The train (endless, resumable at `start_batch`) or eval (one exact pass) pipeline."""
    mean, std = fbd.normalization(model=config.normalize_like)
    common = dict(batch_size=config.batch_size, train=train, data_dir=config.data_dir or None,
                  mean=mean, std=std, mesh=mesh, seed=config.seed, cache=config.cache)
    if train:
        common["start_batch"] = start_batch
    if config.task == "detection":
        d = config.detection
        return fbd.detection_pipeline(
            config.dataset, min_size=d.min_size, max_size=d.max_size,
            pad_size=None if d.pad_size is None else pair(d.pad_size, "config.detection.pad_size"),
            max_instances=d.max_instances, label_offset=d.label_offset,
            label_map=label_map(config), **common)
    if config.task == "segmentation":
        size = (dict(crop_size=pair(config.crop_size, "config.crop_size")) if train
                else dict(eval_size=pair(config.eval_size, "config.eval_size")))
        return fbd.segmentation_pipeline(config.dataset, scale_range=tuple(config.scale_range),
                                         **size, **common)
    side, other = pair(config.image_size, "config.image_size")
    if side != other:
        raise ValueError(f"classifiers train on square crops; config.image_size is "
                         f"{config.image_size}")
    return fbd.classification_pipeline(config.dataset, image_size=side, **common)


def label_map(config):
    """config.detection.label_map as detection_pipeline's table (None: label_offset)."""
    name = config.detection.label_map
    if name and name != "coco":
        raise ValueError(f"config.detection.label_map must be '' or 'coco', got {name!r}")
    return fbd.COCO_CATEGORY_IDS if name else None


def detection_names(config):
    """Class id -> name for the pictures from the dataset's label names, or None."""
    builder = fbd.load_builder(config.dataset, config.data_dir or None)
    names = list(getattr(builder.info.features["objects"]["label"], "names", None) or [])
    if not names:
        return None
    table = label_map(config) or [i + config.detection.label_offset for i in range(len(names))]
    out = ["background", *(f"class_{i}" for i in range(1, max(table) + 1))]
    for name, class_id in zip(names, table):
        out[class_id] = name if class_id else "background"
    return out


def add(total, sums):
    return sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)


def input_shape(config):
    """The sample batch shape the train state is created with."""
    if config.task == "detection":  # detector variables do not depend on the image size
        pad = config.detection.pad_size
        return (1, *(pair(pad, "config.detection.pad_size") if pad is not None else (64, 64)), 3)
    return (1, *pair(config.crop_size if config.task == "segmentation" else config.image_size), 3)


def evaluate_detection(predict_step, state, data, config, mesh):
    """COCO AP (pycocotools) over one exact pass of `data`: against the annotation json of
    config.detection.annotations, or the pipeline's own ground truth mapped back."""
    from flaxbones.detection.coco_eval import CocoEvaluator, batch_ground_truth
    d = config.detection
    evaluator = CocoEvaluator(d.annotations or None, iou_types=tuple(d.iou_types),
                              categories=range(1, config.num_classes))
    for batch in data:
        outputs, rows = ft.host_rows((predict_step(state, batch), batch), mesh)
        evaluator.add(fb.detection.postprocess(outputs, rows["image_size"],
                                               rows["original_size"]),
                      rows["image_id"], rows["valid"])
        if not d.annotations:
            evaluator.add_ground_truth(batch_ground_truth(rows))
    return evaluator.evaluate()


def evaluate(eval_step, state, data, task):
    """Metrics over one exact pass of `data` (padding examples masked out)."""
    total = None
    for batch in data:
        total = add(total, eval_step(state, batch))
    return ft.summarize(jax.device_get(total))


class Log:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir):
        self.main = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.writer = None
        if self.main:
            import tensorflow as tf
            self.tf = tf
            self.writer = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step, split, metrics):
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        if not self.main:
            return scalars
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        with self.writer.as_default(step=step):
            for k, v in scalars.items():
                self.tf.summary.scalar(f"{split}/{k}", v)
        self.writer.flush()
        return scalars


def initial_state(config, model, policy, tx, mesh, input_shape, ckpt):
    """(state, data position): the latest checkpoint's, or fresh (optionally warm-started)."""
    def create():
        return ft.create_train_state(model, tx, jax.random.key(config.seed), input_shape, mesh,
                                     policy=policy)

    if ckpt.latest_step is not None:
        restored = ckpt.restore(abstract_state_like(jax.eval_shape(create)))
        print(f"resumed from step {restored.step} in {ckpt.directory}")
        return restored.state, restored.data
    state = create()
    if config.init_from:
        state = warm_start(state, config)
    return state, 0


def warm_start(state, config):
    """Weights from config.init_from: a flaxbones checkpoint directory (its backbone), a
    weight file of the config's own model (e.g. a torchvision COCO detector to fine-tune:
    everything but the class-specific layers), or one of a classifier `init_from_model`
    (e.g. ImageNet weights: the backbone)."""
    from flax import traverse_util
    source, source_model = config.init_from, config.init_from_model
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if pathlib.Path(source).is_dir():
        merged, report = transfer(source, variables, subtrees=("backbone",))
        loaded, kept = len(report.loaded), len(report.skipped)
    elif not source_model:
        raise ValueError("init_from is a weight file: set init_from_model to the model name "
                         "it belongs to (e.g. 'resnet50', or config.model itself)")
    elif source_model == config.model:
        weights, report = fb.load_pretrained(
            source_model, source, skip_head=True, return_report=True,
            num_classes=config.num_classes, **config.model_kwargs.to_dict())
        flat = traverse_util.flatten_dict(variables, sep="/")
        new = traverse_util.flatten_dict(weights, sep="/")
        merged = traverse_util.unflatten_dict(
            {k: v if k in report.skipped else new[k] for k, v in flat.items()}, sep="/")
        loaded, kept = len(flat) - len(report.skipped), len(report.skipped)
    else:
        weights = fb.load_pretrained(source_model, source, skip_head=True)
        merged = {c: {**variables[c], "backbone": weights[c]["backbone"]} for c in variables}
        loaded = len(jax.tree.leaves(weights["params"]["backbone"]))
        kept = len(jax.tree.leaves(variables)) - len(jax.tree.leaves(merged["params"]["backbone"]))
    print(f"warm start from {source}: {loaded} leaves loaded, {kept} left as initialised")
    merged = jax.device_put(merged, jax.tree.map(lambda a: a.sharding, variables))
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


def save_pictures(config, model, state, eval_data, workdir, predict_step=None):
    """Curves, and overlays (segmentation), a confusion matrix (classification) or
    detections (through the evaluation's `predict_step`).

    Every process runs the predictions (they are collective on a multi-host mesh);
    process 0 writes the files.
    """
    from jax.experimental import multihost_utils
    out = pathlib.Path(workdir) / "pictures"
    mean, std = fbd.normalization(model=config.normalize_like)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    predict = jax.jit(lambda v, x: model.apply(v, x, train=False)["out"].argmax(-1))

    def gathered(batch):
        preds = predict(variables, batch["image"])
        return multihost_utils.process_allgather((batch, preds), tiled=True)

    main = jax.process_index() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        pictures.plot_curves(pathlib.Path(workdir) / "metrics.jsonl", out / "curves.png")
    if config.task == "detection":
        return [out / "curves.png", save_detections(config, predict_step, state, eval_data, out)]
    if config.task == "segmentation":
        batch, preds = gathered(next(iter(eval_data)))
        keep = np.flatnonzero(batch["valid"])[:config.num_pictures]
        classes = list(fbd.sources.dataset_spec(config.dataset).segmentation_classes) or None
        if main:
            images = pictures.denormalize(batch["image"][keep], mean, std)
            pictures.save_overlays(out / "overlays.png", images, batch["segmentation"][keep],
                                   preds[keep], classes)
        return [out / "curves.png", out / "overlays.png"]
    cm = np.zeros((config.num_classes,) * 2, np.int64)
    for batch in eval_data:
        batch, preds = gathered(batch)
        valid = np.asarray(batch["valid"], bool)
        np.add.at(cm, (np.asarray(batch["label"])[valid], np.asarray(preds)[valid]), 1)
    if main:
        pictures.plot_confusion(cm, class_names(config), out / "confusion.png")
    return [out / "curves.png", out / "confusion.png"]


def save_detections(config, predict_step, state, eval_data, out):
    """Held-out images: ground truth beside the detections (the evaluation's own predict
    step), in the resized frame."""
    from jax.experimental import multihost_utils
    batch = next(iter(eval_data))
    outputs = predict_step(state, batch)
    batch, outputs = multihost_utils.process_allgather((batch, outputs), tiled=True)
    path = out / "detections.png"
    if jax.process_index() != 0:
        return path
    keep = np.flatnonzero(batch["valid"])[:config.num_pictures]
    sizes = np.asarray(batch["image_size"])[keep]
    preds = fb.detection.postprocess({k: np.asarray(v)[keep] for k, v in outputs.items()},
                                     sizes, sizes)
    truths = [{"boxes": batch["boxes"][i][batch["instance_valid"][i]],
               "labels": batch["labels"][i][batch["instance_valid"][i]],
               **({"masks": batch["masks"][i][batch["instance_valid"][i]]}
                  if "masks" in batch else {})} for i in keep]
    mean, std = fbd.normalization(model=config.normalize_like)
    h, w = sizes.max(0)
    images = pictures.denormalize(batch["image"][keep][:, :h, :w], mean, std)
    pictures.save_detections(path, images, truths, preds, detection_names(config))
    return path


def class_names(config):
    """The dataset's label names when TFDS knows them, else None."""
    builder = fbd.load_builder(config.dataset, config.data_dir or None)
    feature = builder.info.features[fbd.sources.dataset_spec(config.dataset).label_key]
    return list(getattr(feature, "names", None) or []) or None


def train_and_evaluate(config, workdir):
    """Train for config.num_steps (resuming if the workdir has a checkpoint); return the
    final eval metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = ft.make_mesh()
    model, policy = build_model(config)
    task = build_task(config)
    tx = build_optimizer(config)
    shape = input_shape(config)
    shardings = ft.state_shardings(model, tx, shape, mesh, policy=policy)
    meta = {"model": config.model, "model_kwargs": {"num_classes": config.num_classes,
                                                     **config.model_kwargs.to_dict()},
            "config": json.loads(config.to_json())}
    log = Log(workdir)
    with Checkpoints(workdir / "checkpoints", save_every=config.checkpoint_every,
                     keep=config.keep_checkpoints, best_metric=config.best_metric or None,
                     meta=meta) as ckpt, PreemptionGuard() as guard:
        state, position = initial_state(config, model, policy, tx, mesh, shape, ckpt)
        step = int(state.step)
        train_step = ft.make_train_step(task, mesh, shardings, policy=policy,
                                        bn_mode=config.bn_mode, check_every=config.log_every)
        if config.task == "detection":
            predict_step = ft.make_predict_step(task, mesh, shardings, policy=policy)
            def run_eval(state):
                return evaluate_detection(predict_step, state, eval_data, config, mesh)
        else:
            predict_step = None
            eval_step = ft.make_eval_step(task, mesh, shardings, policy=policy)
            def run_eval(state):
                return evaluate(eval_step, state, eval_data, task)
        train_data = build_data(config, mesh, train=True, start_batch=position)
        eval_data = build_data(config, mesh, train=False)
        metrics, total, seen, tick = {}, None, 0, time.time()
        bar = tqdm.tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        for batch in train_data:
            if step >= config.num_steps:
                break
            state, sums = train_step(state, batch)
            step, position, seen = step + 1, position + 1, seen + config.batch_size
            total = add(total, sums)
            bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                train_step.check_finite()  # a non-finite update was dropped: stop and say so
                rate = seen / (time.time() - tick)
                scalars = log.write(step, "train", {**ft.summarize(jax.device_get(total)),
                                                    "images_per_sec": rate})
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{rate:.1f}")
                total, seen, tick = None, 0, time.time()
            stop = guard.should_stop(step)
            if step % config.eval_every == 0 or step == config.num_steps:
                metrics = run_eval(state)
                scalars = log.write(step, "eval", metrics)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
                ckpt.save(step, state, data=position, metrics=scalars, force=True)
            else:
                ckpt.save(step, state, data=position, force=stop)
            if stop:
                bar.write(f"stopping at step {step} on request; checkpoint saved")
                break
        bar.close()
        train_step.check_finite()
        ckpt.wait()
    if not metrics:
        metrics = run_eval(state)
    paths = save_pictures(config, model, state, eval_data, workdir, predict_step)
    if jax.process_index() == 0:
        print("pictures: " + ", ".join(str(p) for p in paths))
    return metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS narrate every file at INFO
    given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in given):
        ft.initialize(*given)
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    keys = [k for k in ("miou", "pixel_accuracy", "top1", "top5", "loss", "bbox/AP", "bbox/AP50",
                        "segm/AP", "segm/AP50", "keypoints/AP") if k in metrics]
    print("final eval: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
