"""SGD with momentum and *coupled* weight decay, as PyTorch's ``torch.optim.SGD`` (MoCo, DenseCL, MCL)."""

import keras
from keras import ops

from keras_pqcl.schedules import WarmupCosine


@keras.saving.register_keras_serializable(package="keras_pqcl")
class SGD(keras.optimizers.Optimizer):
    """``torch.optim.SGD(momentum, weight_decay)``: the decay is added to the gradient.

    Per step: ``g <- g + wd p``; ``buf <- momentum buf + g`` (``buf = g`` on the first step);
    ``p <- p - lr buf``. Keras' own ``SGD(weight_decay=...)`` decays the weights directly
    (``p *= 1 - lr wd``), outside the momentum buffer: with momentum 0.9 the torch form is
    about 10x stronger in the steady state, so the contrastive recipes need this one.

    Every variable is decayed, BatchNorm and biases included, as the MoCo/DenseCL code does.

    Args:
        learning_rate: float or schedule of the step.
        momentum: 0.9.
        weight_decay: 1e-4.
    """

    def __init__(self, learning_rate=0.03, momentum=0.9, weight_decay=1e-4, name="sgd", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = float(momentum)
        self.decay = float(weight_decay)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._buffers = self.add_optimizer_variables(var_list, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        buf_var = self._buffers[self._get_variable_index(variable)]
        p, buf = ops.convert_to_tensor(variable), ops.convert_to_tensor(buf_var)
        g = ops.cast(gradient, variable.dtype)
        if self.decay:
            g = g + self.decay * p
        if self.momentum:
            # torch starts the buffer at the first gradient rather than at momentum * 0 + g,
            # which is the same thing when the buffer starts at zero.
            g = buf * self.momentum + g
            self.assign(buf_var, g)
        self.assign(variable, p - ops.cast(learning_rate, variable.dtype) * g)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.decay)
        return config


def moco_sgd(
    batch_size, epochs, steps_per_epoch, base_lr=0.03, min_lr=0.0, warmup_epochs=0, momentum=0.9, weight_decay=1e-4
):
    """The MoCo-v2/DenseCL optimizer: :class:`SGD` with ``lr = base_lr * batch_size / 256``,
    an optional linear warm-up, then cosine to ``min_lr`` over the run."""
    total = int(epochs * steps_per_epoch)
    if total <= 0:
        raise ValueError(f"epochs x steps_per_epoch must be positive, got {epochs} x {steps_per_epoch}.")
    warmup = int(min(warmup_epochs, epochs) * steps_per_epoch)
    lr = WarmupCosine(base_lr * batch_size / 256.0, min_lr, total, warmup_steps=warmup)
    return SGD(learning_rate=lr, momentum=momentum, weight_decay=weight_decay)
