"""InfoNCE against a queue of negatives (MoCo; He et al. 2020) and the queue itself.

DenseCL uses two of these: the global term on pooled 128-d embeddings and
the dense term on every position of the dense embedding map, each with its own 65,536-entry
queue. Every row's logits are ``[<q, k+>, <q, n_1>, ..., <q, n_K>] / tau`` with the positive
in column 0, and the loss is the mean cross-entropy against class 0.

The queue is read *before* it is updated: the current batch's keys are never negatives in the
step that produces them. Enqueue after computing the loss.
"""

import keras
from keras import ops

from keras_pqcl.backend import cross_replica_concat


def info_nce(query, positive, negatives, temperature=0.2):
    """Mean InfoNCE of ``M`` rows, computed in float32.

    Args:
        query: ``(M, C)``, L2-normalised; gradients flow through it.
        positive: ``(M, C)``, the positive key of each row (L2-normalised); no gradient.
        negatives: ``(K, C)``, shared negatives (a queue); no gradient.
        temperature: tau (0.2 in MoCo-v2 and DenseCL).

    Returns:
        scalar ``mean_m [logsumexp(l_m / tau) - l_m0 / tau]``.
    """
    q = ops.cast(query, "float32")
    k = ops.stop_gradient(ops.cast(positive, "float32"))
    n = ops.stop_gradient(ops.cast(negatives, "float32"))
    pos = ops.sum(q * k, axis=-1, keepdims=True)  # (M, 1)
    neg = ops.matmul(q, ops.transpose(n))  # (M, K)
    logits = ops.concatenate([pos, neg], axis=-1) / temperature
    return ops.mean(ops.logsumexp(logits, axis=-1) - logits[:, 0])


@keras.saving.register_keras_serializable(package="keras_pqcl")
class UnitNormal(keras.initializers.Initializer):
    """Rows of N(0, 1) draws scaled to unit L2 norm along the last axis (MoCo's queue init)."""

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        x = keras.random.normal(shape, dtype="float32", seed=self.seed)
        return ops.cast(ops.normalize(x, axis=-1), dtype or "float32")

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Queue(keras.layers.Layer):
    """FIFO memory of ``size`` vectors of ``dim`` (non-trainable, float32).

    ``entries`` ``(size, dim)`` starts as random unit vectors; ``pointer`` (int32) is the row
    the next key goes to. :meth:`enqueue` writes the *global* batch of keys (gathered across
    replicas under ``tf.distribute`` / ``torch.distributed``; JAX already sees the global
    batch) at ``pointer, pointer + 1, ...`` modulo ``size`` and advances the pointer, so the
    oldest entries are overwritten first. Unlike the reference, ``size`` need not be a
    multiple of the batch: writes wrap around row by row.

    Args:
        size: number of entries (65,536).
        dim: vector width (128).
    """

    def __init__(self, size=65536, dim=128, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.size = int(size)
        self.dim = int(dim)
        if self.size < 1 or self.dim < 1:
            raise ValueError(f"Queue size and dim must be positive, got size={size}, dim={dim}.")
        self.entries = self.add_weight(
            name="entries", shape=(self.size, self.dim), initializer=UnitNormal(), trainable=False, dtype="float32"
        )
        self.pointer = self.add_weight(name="pointer", shape=(), initializer="zeros", trainable=False, dtype="int32")
        self.built = True

    def enqueue(self, keys):
        """Write ``keys`` ``(n, dim)`` (this replica's share of the batch) into the queue."""
        keys = ops.stop_gradient(ops.cast(keys, "float32"))
        keys = cross_replica_concat(keys)
        n = keys.shape[0]
        if n is not None and n > self.size:
            raise ValueError(f"A global batch of {n} keys does not fit a queue of {self.size}; use a larger queue.")
        n = ops.shape(keys)[0]
        rows = (ops.cast(self.pointer, "int32") + ops.arange(n, dtype="int32")) % self.size
        self.entries.assign(ops.scatter_update(self.entries, ops.expand_dims(rows, -1), keys))
        self.pointer.assign((ops.cast(self.pointer, "int32") + ops.cast(n, "int32")) % self.size)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, dim=self.dim)
        config.pop("dtype", None)
        return config


@keras.saving.register_keras_serializable(package="keras_pqcl")
class InfoNCE(keras.layers.Layer):
    """InfoNCE whose negatives are its own :class:`Queue`.

    Args:
        temperature: tau (0.2).
        queue_size: negatives ``K`` (65,536).
        dim: embedding width (128).

    Call args:
        query: ``(M, dim)`` normalised queries; positive: ``(M, dim)`` normalised keys.

    Returns:
        the mean loss (float32). Call :meth:`enqueue` afterwards with the new negatives.
    """

    def __init__(self, temperature=0.2, queue_size=65536, dim=128, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        self.queue_size = int(queue_size)
        self.dim = int(dim)
        self.queue = Queue(self.queue_size, self.dim, name="queue")
        self.built = True

    def call(self, query, positive):
        # A snapshot, not the variable's buffer: torch saves the negatives for the backward
        # pass, and the in-place enqueue after the loss would invalidate them.
        negatives = ops.copy(ops.convert_to_tensor(self.queue.entries))
        return info_nce(query, positive, negatives, self.temperature)

    def enqueue(self, keys):
        self.queue.enqueue(keys)

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature, queue_size=self.queue_size, dim=self.dim)
        config.pop("dtype", None)
        return config
