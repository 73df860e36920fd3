"""The processes of one pre-training run: how many, which one writes, and how they stay in step.

A run is one process, or, under ``torchrun`` (torch backend, ``WORLD_SIZE > 1``), N processes
that each call :func:`keras_pqcl.training.pretrain` with the same arguments and feed their
``1/N`` of every global batch. Process 0, the chief, owns the run folder and writes every
file; the others train beside it and print nothing but errors. The collectives themselves
live in :mod:`keras_pqcl.backend`. JAX and TensorFlow runs are one process in the runner (and
refuse to start as several); their multi-process engines
(:func:`~keras_pqcl.backend.init_jax_distributed`, :func:`~keras_pqcl.backend.init_tf_multiworker`)
are driven from a script.
"""

import contextlib
import os
import warnings

import keras

from keras_pqcl import backend


def join():
    """Join the run's process group (before any model or tensor exists) and return the number
    of processes; 1 without ``torchrun``.

    On JAX and TensorFlow the runner is one process: launched as several (``WORLD_SIZE``,
    ``KERAS_PQCL_NUM_PROCESSES`` or a ``TF_CONFIG`` cluster above 1), each would train a model
    of its own, so this raises a one-line ValueError instead."""
    if backend.BACKEND != "torch":
        request = backend.launch_request()
        if request:
            raise ValueError(
                f"{request} asks for several processes, but keras-pqcl pretrain trains {backend.BACKEND} as one "
                "process (each would train a model of its own); use KERAS_BACKEND=torch with torchrun, a train.py "
                f"as in the README's 'Several machines', or unset {request.split('=')[0]}."
            )
        return 1
    backend.init_torch_distributed()
    return backend.process_count()


def check(recipe, needs, count):
    """Raise a one-line ValueError when ``recipe`` (whose method needs ``needs``) cannot train
    as ``count`` processes."""
    if needs.batches == "montage":
        raise ValueError(
            f"recipe {recipe.name!r} trains MCL, whose montages mix the images of the whole batch, so it "
            f"cannot run as {count} processes; run it as one process (without torchrun)."
        )
    if recipe.batch_size % count:
        below = max(recipe.batch_size // count, 1) * count
        raise ValueError(
            f"--batch-size {recipe.batch_size} is the global batch of all {count} processes and does not divide "
            f"by {count}; pass a multiple of {count} (e.g. {below})."
        )


@contextlib.contextmanager
def silenced():
    """Standard output and warnings of a process other than the chief, dropped: the chief
    already prints the same notices, progress and warnings. Errors still propagate."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def share_chief_weights(model):
    """Give every process the chief's values of every variable of ``model`` and of its
    optimizer, each once, in the same order on every process."""
    seen, state = set(), []
    for v in [*model.variables, *(model.optimizer.variables if model.optimizer is not None else [])]:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    backend.broadcast_from_chief(state)


class StopTogether(keras.callbacks.Callback):
    """Every process stops after an epoch if any asks to: a process that left ``fit`` alone
    would leave the others waiting in the next step's gradient all-reduce. (The collapse
    guard reads per-process values, e.g. ``teacher_entropy``, so the processes may disagree.)
    Last in the callback list, after every callback that may stop the run."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = backend.any_process(self.model.stop_training)
