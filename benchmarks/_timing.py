"""Step timing shared by the step benchmarks."""

import time

import numpy as np


def time_fit_steps(model, batch, steps):
    """``(first_step_s, median_step_s)`` of ``model.fit`` on ``batch`` repeated.

    The first step includes tracing/compilation. A callback that reads the loss makes Keras
    sync the logs to host, so the time between batch begin and end is the whole step.
    """
    import keras
    import tensorflow as tf

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
    return timer.times[0], float(np.median(timer.times[1:]))
