"""Training engine: state, mesh and sharding, steps (jit and pmap), precision,
optimizers, losses and metrics. Pure functions any script calls."""
from flaxbones.train.distributed import initialize, is_main_process
from flaxbones.train.losses import segmentation_cross_entropy, softmax_cross_entropy
from flaxbones.train.metrics import (confusion_matrix, predictions, segmentation_scores,
                                     summarize, topk_correct)
from flaxbones.train.optim import decay_mask, make_optimizer, make_schedule
from flaxbones.train.pmap import (make_pmap_eval_step, make_pmap_train_step, replicate,
                                  split_batch, unreplicate)
from flaxbones.train.precision import LossScale, Policy
from flaxbones.train.remat import remat_blocks
from flaxbones.train.sharding import (FSDP_RULES, batch_sharding, make_mesh, pad_batch,
                                      shard_batch, tree_shardings)
from flaxbones.train.state import TrainState, create_train_state, state_shardings
from flaxbones.train.steps import (host_rows, make_eval_step, make_predict_step,
                                   make_train_step)
from flaxbones.train.tasks import Classification, Detection, Segmentation, Task

__all__ = [
    "Classification", "Detection", "FSDP_RULES", "LossScale", "Policy", "Segmentation",
    "Task", "TrainState", "batch_sharding", "confusion_matrix", "create_train_state",
    "decay_mask", "host_rows", "initialize", "is_main_process", "make_eval_step",
    "make_mesh", "make_optimizer", "make_pmap_eval_step", "make_pmap_train_step",
    "make_predict_step", "make_schedule", "make_train_step", "pad_batch", "predictions",
    "remat_blocks", "replicate", "segmentation_cross_entropy", "segmentation_scores",
    "shard_batch", "softmax_cross_entropy", "split_batch", "state_shardings", "summarize",
    "topk_correct", "tree_shardings", "unreplicate",
]
