"""The `tf.distribute` strategy of a run, and what multi-worker training needs."""

import os

import tensorflow as tf

from bs_keras.training.errors import RunError

STRATEGIES = ("auto", "cpu", "mirrored", "multi_worker", "tpu")


def make_strategy(name):
    """The `tf.distribute` strategy for `--strategy NAME`."""
    if name not in STRATEGIES:
        raise RunError(f"--strategy={name!r} is invalid: choose one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise RunError(
                "--strategy multi_worker needs the TF_CONFIG environment variable "
                "(cluster addresses and this worker's index), e.g. "
                'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}\'.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError) as e:
        raise RunError(f"--strategy tpu: no TPU found ({e}). Run on a TPU VM or pick another strategy.")
    return tf.distribute.TPUStrategy(resolver)


def patch_multi_worker_reduce(strategy):
    """Works around Keras 3.15 `fit` under MultiWorkerMirroredStrategy with >1 worker.

    Keras calls `strategy.reduce("MEAN", (x, y), axis=None)` on the first
    batch (`_maybe_symbolic_build`) and `strategy.reduce("MEAN", scalar,
    axis=0)` on every step's logs (`reduce_per_replica`); the collective
    strategy accepts neither a nest nor axis=0 on a scalar. Other strategies
    are left as they are.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    reduce = strategy.reduce

    def nested_reduce(reduce_op, value, axis=None):
        def one(v):
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return reduce(reduce_op, v, axis=axis if rank else None)

        return tf.nest.map_structure(one, value)

    strategy.reduce = nested_reduce


def worker_info(strategy):
    """(is_chief, task_index) for this process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id
    chief = task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )
    return chief, task_id or 0


def shard_by_data(strategy, *datasets):
    """The datasets, sharded by element across the workers of a multi-worker
    strategy (a file-less tf.data pipeline cannot shard by file); unchanged
    under any other strategy."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return datasets
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tuple(ds.with_options(options) for ds in datasets)
