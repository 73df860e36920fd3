"""BatchNorm that always normalises with the statistics of the batch it sees (the heads' BN)."""

import keras
from keras import ops

from keras_pqcl.backend import cross_replica_mean


@keras.saving.register_keras_serializable(package="keras_pqcl")
class BatchStatNorm(keras.layers.Layer):
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch's mean and variance.

    DINO's ``use_bn_in_head`` puts ``BatchNorm1d`` after the hidden layers of the projection
    head, and the reference keeps student *and* teacher in train mode for the whole run, so
    both heads always normalise with the statistics of the current batch (the biased
    variance, as PyTorch normalises). The heads are thrown away after pre-training, so the
    running averages a ``BatchNormalization`` would keep are never read; this layer keeps
    none. That leaves no state to update inside the train step, and the teacher's copy is an
    EMA of ``gamma`` and ``beta`` like any other weight.

    The statistics are taken over every axis but the last: over the batch for ``(B, C)``,
    and over batch and tokens for ``(B, N, C)`` (what iBOT's head does with its BN on
    token sequences). The statistics are those of the global batch in a run of several
    replicas or processes, as the reference's ``SyncBatchNorm``: mean and variance are
    averaged over the replicas (``tf.distribute``, ``torch.distributed``; every replica holds
    an equal share), and the gradient flows through that average; under
    ``keras.distribution`` (JAX) the batch is already global.

    Args:
        epsilon: 1e-5 (PyTorch's default).

    Call args:
        x: ``(..., C)``; computed in float32.

    Returns:
        ``(..., C)``, the dtype of ``x``.
    """

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        axes = tuple(range(len(x.shape) - 1))
        mean = cross_replica_mean(ops.mean(x32, axis=axes, keepdims=True))
        var = cross_replica_mean(ops.mean(ops.square(x32 - mean), axis=axes, keepdims=True))
        y = (x32 - mean) * ops.rsqrt(var + self.epsilon) * ops.cast(self.gamma, "float32")
        return ops.cast(y + ops.cast(self.beta, "float32"), x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config
