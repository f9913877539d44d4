"""Training runs: strategy, tasks, model and optimizer, run directory, the run.

`train.py` parses flags into a `Recipe` and calls `train(...)` or
`evaluate(...)`; everything else lives here, one module per concept:

- `strategy`: the `tf.distribute` strategy (`make_strategy`) and what
  multi-worker training needs;
- `tasks`: `ClassificationTask` and `SegmentationTask`, what each builds,
  reads, compiles with and reports;
- `model`: the recipe's model (`build_model`, `--gate-from`,
  `--prune-from`, distillation), optimizer and gate-loss schedule;
- `run_dir`: the run directory, its checkpoints (`RunCheckpoint`) and
  resume (`resume_states`, `resume`), together;
- `run`: `train` and `evaluate`, step by step.

A run directory holds `config.json` (the resolved recipe and runtime),
`logs/` (TensorBoard), `log.csv`, `last.keras`, `best.keras`, `state/`
(weights + optimizer of the last two completed epochs, for resume) and, at
the end, `report.json`, `per_sample.npz` and two PNG plots. While a run
writes it, `.lock` names its process (`bs_keras.run_lock.RunLock`).
"""

import bs_keras
from bs_keras.callbacks import StopOnNaN
from bs_keras.training.errors import RunError
from bs_keras.training.model import (
    build_for_fit,
    build_model,
    build_optimizer,
    gate_callback,
    gated_from,
    init_backbone,
    learning_rate,
    rebuild_at_size,
    with_distillation,
)
from bs_keras.training.run import EXIT_NAN, evaluate, file_sha256, train
from bs_keras.training.run_dir import (
    CheckpointWriteError,
    RunCheckpoint,
    keras_file_problem,
    load_state,
    prepare_run_dir,
    restore_checkpoint,
    resume,
    resume_states,
)
from bs_keras.training.strategy import STRATEGIES, make_strategy
from bs_keras.training.tasks import ClassificationTask, SegmentationTask, classification_report, make_task

# Runs load saved models (--gate-from, --prune-from, --init-from, --evaluate).
bs_keras.register_custom_objects()
