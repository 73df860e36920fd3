"""Schedules vs DINO's NumPy ``cosine_scheduler`` and teacher-temperature warm-up."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_pqcl.schedules import WarmupCosine, cosine, warmup_then_constant

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING


def dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0.0):
    """DINO utils.cosine_scheduler: linspace warm-up (endpoint included), then cosine."""
    warmup_iters = warmup_epochs * niter
    warmup = np.array([])
    if warmup_iters > 0:
        warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter
    return schedule


CASES = [
    # base, final, epochs, niter, warmup_epochs, start_warmup_value
    (1e-3, 1e-6, 6, 5, 2, 0.0),  # DINO learning rate: warm-up from 0
    (0.04, 0.4, 6, 5, 0, 0.0),  # DINO weight decay: cosine rising, no warm-up
    (0.996, 1.0, 4, 3, 0, 0.0),  # teacher momentum
    (0.5, 0.1, 3, 4, 1, 0.2),  # warm-up from a non-zero value
    (0.3, 0.0, 5, 1, 1, 0.0),  # one warm-up step: linspace(a, b, 1) == [a]
]


@pytest.mark.parametrize("base, final, epochs, niter, warmup_epochs, start", CASES)
def test_cosine_matches_dino_scheduler(base, final, epochs, niter, warmup_epochs, start):
    ref = dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs, start)
    total, warm = epochs * niter, warmup_epochs * niter
    steps = np.arange(total)
    got = to_numpy(cosine(ops.convert_to_tensor(steps), total, base, final, warm, start))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    sched = WarmupCosine(base, final, total, warmup_steps=warm, warmup_start=start)
    np.testing.assert_allclose(to_numpy(sched(ops.convert_to_tensor(steps))), ref, rtol=1e-5, atol=1e-7)
    # Scalar steps, including an int64 step counter like ``optimizer.iterations``.
    counter = keras.Variable(0, dtype="int64", trainable=False)
    for step in (0, max(warm - 1, 0), warm, total - 1):
        counter.assign(step)
        np.testing.assert_allclose(float(to_numpy(sched(counter))), ref[step], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(to_numpy(sched(step))), ref[step], rtol=1e-5, atol=1e-7)
    # Past the end the schedule holds its final value.
    np.testing.assert_allclose(float(to_numpy(sched(total + 10))), final, rtol=1e-6, atol=1e-7)


def test_warmup_then_constant_matches_linspace_per_epoch():
    epochs = 100
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), 0.07 * np.ones(epochs - 30)))
    got = to_numpy(warmup_then_constant(ops.convert_to_tensor(np.arange(epochs)), 0.04, 0.07, 30))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    for epoch in (0, 29, 30, 99):
        np.testing.assert_allclose(float(to_numpy(warmup_then_constant(epoch, 0.04, 0.07, 30))), ref[epoch], rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2])
def test_warmup_then_constant_short_warmups(warmup_epochs):
    epochs = np.arange(5)
    ref = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), 0.07 * np.ones(5 - warmup_epochs)))
    got = to_numpy(warmup_then_constant(ops.convert_to_tensor(epochs), 0.04, 0.07, warmup_epochs))
    np.testing.assert_allclose(np.broadcast_to(got, (5,)), ref, rtol=1e-6)


def test_warmup_cosine_config_round_trip():
    sched = WarmupCosine(5e-4, 1e-6, total_steps=120, warmup_steps=20, warmup_start=1e-5)
    config = sched.get_config()
    assert config == dict(start=5e-4, end=1e-6, total_steps=120, warmup_steps=20, warmup_start=1e-5)
    clone = WarmupCosine.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(restored, WarmupCosine) and restored.get_config() == config
    steps = ops.convert_to_tensor(np.arange(0, 130, 7))
    np.testing.assert_array_equal(to_numpy(clone(steps)), to_numpy(sched(steps)))
    np.testing.assert_array_equal(to_numpy(restored(steps)), to_numpy(sched(steps)))
