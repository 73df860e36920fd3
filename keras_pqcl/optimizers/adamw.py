"""AdamW with the DINO/iBOT conventions, usable on every backend."""

import math

import keras
from keras import ops

from keras_pqcl.schedules import WarmupCosine


@keras.saving.register_keras_serializable(package="keras_pqcl")
class AdamW(keras.optimizers.Optimizer):
    """AdamW exactly as PyTorch's, plus DINO's clipping, decay groups and layer freezing.

    Differences from ``keras.optimizers.AdamW``, each taken from the reference code:

    * PyTorch's epsilon placement: ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` with
      ``eps = 1e-8`` (Keras adds eps to ``sqrt(v)`` before the bias correction).
    * ``weight_decay`` may be a schedule of the step (DINO: cosine 0.04 -> 0.4); decoupled,
      ``p *= 1 - lr * wd``, only for tensors with ndim >= 2 that are not biases (this decays
      the CLS token, position table and mask token like the reference; LayerNorm and biases
      are not decayed).
    * Per-tensor gradient clipping ``g *= min(1, clip / (||g|| + 1e-6))`` applied inside the
      update, i.e. after the cross-replica gradient sum (Keras' ``clipnorm`` runs before it
      under ``tf.distribute``).
    * :meth:`freeze` keeps chosen variables (DINO's head ``last_layer``) completely unchanged
      - no Adam moments, no decay - until a given step, like setting their grads to ``None``.

    Args:
        learning_rate: float or schedule of the step.
        weight_decay: float or schedule of the step.
        beta_1, beta_2, epsilon: Adam constants (PyTorch defaults).
        clip_per_tensor: per-tensor gradient-norm bound; ``None`` disables it.
    """

    def __init__(
        self,
        learning_rate=5e-4,
        weight_decay=0.04,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        clip_per_tensor=3.0,
        name="adamw",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        if isinstance(weight_decay, dict):
            weight_decay = keras.saving.deserialize_keras_object(weight_decay)
        self.decay = weight_decay
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.clip_per_tensor = clip_per_tensor
        self._frozen_indices = set()

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m, self._v = self.add_optimizer_variables(var_list, ["m", "v"])
        self._decays = [len(v.shape) >= 2 and not v.name.endswith("bias") for v in var_list]
        self.freeze_until = self.add_variable(
            shape=(), dtype=self.iterations.dtype, initializer="zeros", name="freeze_until"
        )

    def freeze(self, variables, until_step):
        """Leave ``variables`` untouched while ``iterations < until_step``."""
        for variable in variables:
            self._frozen_indices.add(self._get_variable_index(variable))
        self.freeze_until.assign(int(until_step))

    def current_weight_decay(self):
        decay = self.decay
        if callable(decay):
            return decay(self.iterations)
        return decay

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # A subclass that changes the per-variable update (per-variable learning rates) keeps
        # the per-variable loop, which calls its update_step.
        if keras.backend.backend() != "torch" or type(self).update_step is not AdamW.update_step:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        # Eager torch: the update of ``update_step`` as one fused kernel (see torch_fused).
        from keras_pqcl.optimizers.torch_fused import fused_adamw_step

        fused_adamw_step(self, grads, trainable_variables, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        m_var, v_var = self._m[index], self._v[index]
        p, m, v = (ops.convert_to_tensor(x) for x in (variable, m_var, v_var))
        g = ops.cast(gradient, dtype)
        if self.clip_per_tensor:
            norm = ops.sqrt(ops.sum(ops.square(g)))
            g = g * ops.minimum(1.0, self.clip_per_tensor / (norm + 1e-6))
        lr = ops.cast(learning_rate, dtype)
        iterations = self.iterations
        if index in self._frozen_indices:
            # torch keeps one step count per parameter and a parameter whose grad is None
            # does not step: after unfreezing, bias corrections restart from step 1.
            iterations = iterations - ops.minimum(iterations, self.freeze_until)
        step = ops.cast(iterations + 1, dtype)
        # 1 - beta**t as -expm1(t log beta): float32 keeps torch's float64 accuracy for small t.
        bias1 = -ops.expm1(step * math.log(self.beta_1))
        bias2 = -ops.expm1(step * math.log(self.beta_2))
        new_m = m * self.beta_1 + g * (1.0 - self.beta_1)
        new_v = v * self.beta_2 + ops.square(g) * (1.0 - self.beta_2)
        new_p = p
        if self._decays[index] and self.decay:
            new_p = new_p * (1.0 - lr * ops.cast(self.current_weight_decay(), dtype))
        denom = ops.sqrt(new_v) / ops.sqrt(bias2) + self.epsilon
        new_p = new_p - (lr / bias1) * new_m / denom
        if index in self._frozen_indices:
            frozen = ops.less(self.iterations, self.freeze_until)
            new_p = ops.where(frozen, p, new_p)
            new_m = ops.where(frozen, m, new_m)
            new_v = ops.where(frozen, v, new_v)
        self.assign(m_var, new_m)
        self.assign(v_var, new_v)
        self.assign(variable, new_p)

    def get_config(self):
        config = super().get_config()
        decay = self.decay
        if isinstance(decay, keras.optimizers.schedules.LearningRateSchedule):
            decay = keras.saving.serialize_keras_object(decay)
        config.update(
            weight_decay=decay,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            clip_per_tensor=self.clip_per_tensor,
        )
        return config


def dino_adamw(
    batch_size,
    epochs,
    steps_per_epoch,
    base_lr=5e-4,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    clip_per_tensor=3.0,
):
    """The DINO optimizer: AdamW with the paper's schedules.

    * learning rate ``base_lr * batch_size / 256`` after a linear warm-up from 0 over
      ``warmup_epochs`` (capped at ``epochs``), then cosine to ``min_lr``;
    * weight decay cosine ``weight_decay -> weight_decay_end`` over the whole run;
    * per-tensor gradient clipping at ``clip_per_tensor`` (3.0).
    """
    total = int(epochs * steps_per_epoch)
    if total <= 0:
        raise ValueError(f"epochs x steps_per_epoch must be positive, got {epochs} x {steps_per_epoch}.")
    warmup = int(min(warmup_epochs, epochs) * steps_per_epoch)
    lr = WarmupCosine(base_lr * batch_size / 256.0, min_lr, total, warmup_steps=warmup)
    wd = WarmupCosine(weight_decay, weight_decay_end, total)
    return AdamW(learning_rate=lr, weight_decay=wd, clip_per_tensor=clip_per_tensor)
