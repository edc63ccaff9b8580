"""``tf.distribute`` reduction of products over replicas.

Under a strategy (``tf.distribute.MirroredStrategy`` on the devices of one machine, or
``tf.distribute.MultiWorkerMirroredStrategy`` across machines), the data is distributed
with ``strategy.experimental_distribute_dataset``: every global batch is split between the
replicas (each worker's share first, auto-sharded by the strategy's input options). Each
replica computes ``n_r * (product of its mean loss L_r)`` on its ``n_r`` samples inside
``strategy.run``; ``strategy.reduce(SUM)`` all-reduces these sums and the sample counts, and
the operator divides the sum by the total count of the pass. Because the loss is a mean
over samples, ``sum_r n_r L_r`` is the sum over the samples of the batch whatever the
split, so the product equals the one-device product up to the order of the floating-point
sums. (With BatchNorm on batch statistics a replica's share is a batch of its own, as in
training under the same strategy without synchronised BatchNorm.) A replica that receives
no samples (a short last batch, or a worker whose shard ran out) contributes nothing: its
term is masked, never averaged in.

With ``MultiWorkerMirroredStrategy`` every worker builds the same operator on the same
dataset pipeline (or on its own shard, with auto-sharding off): the exact weighting holds
whenever every sample reaches exactly one replica in each pass, and every worker then
holds the same products and runs the same Lanczos recurrence.

References
----------
TensorFlow, *Distributed training with TensorFlow* and *Custom training with
tf.distribute.Strategy*, https://www.tensorflow.org/guide/distributed_training.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def resolve_strategy(strategy: Any, variables: list[Any]) -> Any:
    """The strategy to reduce over, or ``None`` for a plain single-device pass.

    ``strategy`` if given; else the strategy of the enclosing ``strategy.scope()``; else the
    strategy that created the model's variables (distributed variables); else ``None``.
    A default (no-op) strategy counts as ``None``.
    """
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    if strategy is None:
        for v in variables:
            inner = getattr(v, "value", v) if hasattr(v, "path") else v
            s = getattr(inner, "distribute_strategy", None) or getattr(
                inner, "_distribute_strategy", None)
            if s is not None and _is_real(s):
                strategy = s
                break
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"strategy must be a tf.distribute.Strategy; got "
                        f"{type(strategy).__name__}")
    return strategy if strategy is not None and _is_real(strategy) else None


def _is_real(strategy: Any) -> bool:
    return type(strategy).__name__ != "_DefaultDistributionStrategy"


def distribute(strategy: Any, dataset: tf.data.Dataset) -> Any:
    """``strategy.experimental_distribute_dataset(dataset)``."""
    return strategy.experimental_distribute_dataset(dataset)


def run_and_sum(strategy: Any, fn: Any, args: tuple) -> Any:
    """``fn(*args)`` on every replica and the sum of its outputs over replicas (inside a
    traced function); without a strategy, ``fn(*args)``."""
    if strategy is None:
        return fn(*args)
    per_replica = strategy.run(fn, args=args)
    return tf.nest.map_structure(
        lambda t: strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None), per_replica)


def num_replicas(strategy: Any) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)
