"""The processes of one pre-training run: how many, which one writes, and how they stay in step.

A run is one process, or N processes that each call :func:`keras_pqcl.training.pretrain`
with the same arguments and feed their ``1/N`` of every global batch, launched with each
backend's own engine:

* torch: ``torchrun`` (``WORLD_SIZE > 1``; ``torch.distributed``);
* JAX: ``KERAS_PQCL_NUM_PROCESSES`` / ``_COORDINATOR`` / ``_PROCESS_ID`` (the CLI's
  ``--num-processes``, ``--coordinator``, ``--process-id``) or Slurm (``jax.distributed``);
* TensorFlow: ``TF_CONFIG`` or Slurm (``MultiWorkerMirroredStrategy``).

Process 0, the chief, owns the run folder and writes every file; the others train beside it
and print nothing but errors. The collectives themselves live in :mod:`keras_pqcl.backend`.
"""

import contextlib
import os
import warnings

import keras

from keras_pqcl import backend

#: backend -> (the variable that asks its own engine for several processes, how to launch it).
_LAUNCH = {
    "torch": ("WORLD_SIZE", "torchrun"),
    "jax": (backend.NUM_PROCESSES_ENV, "--num-processes/--coordinator/--process-id (or KERAS_PQCL_* variables)"),
    "tensorflow": ("TF_CONFIG", "TF_CONFIG"),
}


def join(coordinator=None, num_processes=None, process_id=None):
    """Join the run's processes (before any model or tensor exists) and return their number;
    1 for a run of one process. Calling it again returns the same number.

    ``coordinator``, ``num_processes``, ``process_id``: a JAX run's settings (the CLI's
    flags); None reads them from the environment
    (:func:`~keras_pqcl.backend.init_jax_distributed`).

    Raises a one-line ValueError when the launch is the engine of another backend (e.g.
    ``torchrun`` under ``KERAS_BACKEND=jax``): each process would otherwise train a model of
    its own."""
    flags = (coordinator, num_processes, process_id)
    own, how = _LAUNCH.get(backend.BACKEND, (None, None))
    if backend.BACKEND != "jax" and any(flag is not None for flag in flags):
        raise ValueError(
            f"--coordinator/--num-processes/--process-id start a JAX run (jax.distributed), but the backend is "
            f"{backend.BACKEND}: launch with {how} instead, or pass --backend jax."
        )
    request = backend.launch_request()
    name = request.split("=")[0] if request else None
    if name and name != own:
        raise ValueError(
            f"{name} asks for several processes, which the {backend.BACKEND} backend does not read (each process "
            f"would train a model of its own): launch {backend.BACKEND} with {how}, or unset {name}."
        )
    if backend.BACKEND == "torch":
        backend.init_torch_distributed()
    elif backend.BACKEND == "jax":
        backend.init_jax_distributed(*flags)
    elif backend.BACKEND == "tensorflow":
        backend.init_tf_multiworker()
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
