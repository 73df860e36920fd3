"""Backend differences in one place: replica count, cross-replica means, gradient steps.

TensorFlow under ``tf.distribute`` runs the step once per replica on a slice of the batch,
so batch statistics (DINO's center) must be all-reduced and hand-written losses divided by
the replica count (gradients are summed across replicas). JAX ``keras.distribution`` runs
one global program (GSPMD), so a batch mean is already global. Torch runs one device per
process; if ``torch.distributed`` is initialised, means are all-reduced across processes.
"""

import keras

BACKEND = keras.backend.backend()


def num_replicas_in_sync():
    """Replicas that each compute a slice of the global batch inside one step."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    if BACKEND == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return 1


def cross_replica_mean(x):
    """Mean of ``x`` over replicas (identity on a single device and under JAX GSPMD)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, x)
        return x
    if BACKEND == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = x.clone()
            dist.all_reduce(x)
            return x / dist.get_world_size()
    return x


def cross_replica_concat(x):
    """``x`` of every replica concatenated along axis 0, in replica order: the global batch.

    For state that must see the whole batch (DenseCL's queues). Identity on a single device
    and under JAX GSPMD, where a batch is already global. No gradient flows through it.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_gather(tf.stop_gradient(x), axis=0)
        return x
    if BACKEND == "torch":
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = x.detach().contiguous()
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x)
            return torch.cat(parts, dim=0)
    return x


def distributable(dataset, model):
    """``dataset`` made safe to feed ``model.fit`` under a multi-replica ``tf.distribute``
    strategy (the one ``model`` was created under).

    Keras' TensorFlow trainer builds a distributed model by MEAN-reducing the first batch
    across replicas, and TensorFlow cannot add booleans: iBOT's ``global_masks`` would stop
    ``fit`` with "Value for attr 'T' of bool". Boolean entries travel as uint8 instead; the
    models cast masks back to bool. Anything else is returned unchanged.
    """
    if BACKEND != "tensorflow":
        return dataset
    import tensorflow as tf

    if getattr(model, "distribute_strategy", tf.distribute.get_strategy()).num_replicas_in_sync < 2:
        return dataset
    if not isinstance(dataset, tf.data.Dataset):
        return dataset
    spec = dataset.element_spec
    if not any(s.dtype == tf.bool for s in tf.nest.flatten(spec) if hasattr(s, "dtype")):
        return dataset
    return dataset.map(
        lambda *x: tf.nest.map_structure(lambda t: tf.cast(t, tf.uint8) if t.dtype == tf.bool else t, x[0] if len(x) == 1 else x),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def ema_update(pairs, momentum):
    """``t <- m t + (1 - m) s`` for every ``(t, s)`` variable pair, in the variables' dtype.

    Torch runs eagerly, so one fused ``_foreach_lerp_`` over all tensors replaces a Python
    loop of small kernels; the other backends compile the loop into the step.
    """
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            teachers = [t.value for t, _ in pairs]
            students = [s.value.detach() for _, s in pairs]
            weight = 1.0 - momentum.to(teachers[0].dtype) if torch.is_tensor(momentum) else 1.0 - momentum
            torch._foreach_lerp_(teachers, students, weight)
        return
    from keras import ops

    for t, s in pairs:
        m = ops.cast(momentum, t.dtype)
        t.assign(t * m + ops.stop_gradient(ops.cast(s, t.dtype)) * (1.0 - m))


# --------------------------------------------------------------------------- train steps
# Every self-supervised model implements, once and in keras.ops only:
#   ssl_forward(data, step, training) -> (loss, logs)   forward + loss + center updates
#   update_teacher(step)                                  EMA of the teacher
#   collect_logs(loss, logs) -> dict                      metrics update
# The classes below add only what differs between backends: how gradients are taken and how
# state is threaded. ``step`` is the optimizer's iteration count *before* this update, the
# index ``it`` of the reference schedules.


class _TensorFlowTrainStep:
    def train_step(self, data):
        import tensorflow as tf

        data = _unpack(data)
        step = tf.identity(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            loss, logs = self.ssl_forward(data, step, training=True)
            # Gradients are summed over replicas; divide so they average instead.
            scaled = self.optimizer.scale_loss(loss / num_replicas_in_sync())
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self.update_teacher(step)
        return self.collect_logs(loss, logs)


class _TorchTrainStep:
    def train_step(self, data):
        import torch

        data = _unpack(data)
        step = self.optimizer.iterations.value.detach().clone()
        self.zero_grad()
        loss, logs = self.ssl_forward(data, step, training=True)
        self.optimizer.scale_loss(loss / num_replicas_in_sync()).backward()
        variables = self.trainable_variables
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            self.optimizer.apply(grads, variables)
            self.update_teacher(step)
        return self.collect_logs(loss, logs)


class _JaxTrainStep:
    def train_step(self, state, data):
        import jax

        data = _unpack(data)
        tv, ntv, ov, mv = state
        trainable, non_trainable = self.trainable_variables, self.non_trainable_variables
        optimizer_vars, metric_vars = self.optimizer.variables, self.metrics_variables

        def forward(tv_values, ntv_values):
            # Every variable the shared code reads must be mapped, the step counter included.
            mapping = [*zip(trainable, tv_values), *zip(non_trainable, ntv_values), *zip(optimizer_vars, ov)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                loss, logs = self.ssl_forward(data, self.optimizer.iterations, training=True)
                scaled = self.optimizer.scale_loss(loss)
            new_ntv = [scope.get_current_value(v) for v in non_trainable]
            return scaled, (loss, logs, new_ntv)

        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (_, (loss, logs, ntv)), grads = grad_fn(tv, ntv)
        tv, new_ov = self.optimizer.stateless_apply(ov, grads, tv)
        # Old optimizer state is mapped so that ``iterations`` still reads this step's index.
        mapping = [*zip(trainable, tv), *zip(non_trainable, ntv), *zip(optimizer_vars, ov), *zip(metric_vars, mv)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.update_teacher(self.optimizer.iterations)
            logs = self.collect_logs(loss, logs)
        ntv = [scope.get_current_value(v) for v in non_trainable]
        mv = [scope.get_current_value(v) for v in metric_vars]
        return logs, (tv, ntv, new_ov, mv)


def _unpack(data):
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    return x


TrainStep = {
    "tensorflow": _TensorFlowTrainStep,
    "torch": _TorchTrainStep,
    "jax": _JaxTrainStep,
}.get(BACKEND)
if TrainStep is None:  # numpy/openvino backends cannot train
    TrainStep = type("TrainStep", (), {})
