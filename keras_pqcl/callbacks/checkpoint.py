"""Checkpoints that cannot lie, and a clear stop when the loss stops being finite.

One checkpoint is one file, ``checkpoint-e{epoch}-s{step}.keras``: the whole pre-training
model (student, teacher, heads, centers, optimizer and its step counter) as Keras saves it,
plus a ``keras_pqcl_progress.json`` member that says where in the run it was written
(epochs done, steps done in the current epoch), the epoch's running metric sums and the
random-generator states that ``model.save`` does not keep (stochastic depth). The member is
added before the file is renamed into place, so a checkpoint's weights and its position can
never disagree. A checkpoint is written only when every weight is finite, only the newest
``keep`` are kept, and :func:`load_latest_checkpoint` resumes from the newest one that loads,
naming every file it skips and why.
"""

import dataclasses
import json
import math
import os
import re
import time
import zipfile

import keras
import numpy as np

from keras_pqcl.io.files import atomic_write

PROGRESS_MEMBER = "keras_pqcl_progress.json"
FORMAT = 2
#: The whole-model layout: 2 since the self-distillation methods became one model of loss
#: terms (keras_pqcl 0.2). Checkpoints of the earlier layout do not load into it.
LAYOUT = 2
_NAME = "checkpoint-e{epoch:05d}-s{step:07d}.keras"
_NAME_RE = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.keras$")
#: keras_pqcl 0.1 wrote one ``checkpoint.keras`` and its epoch count in ``checkpoint.json``.
LEGACY_FILE = "checkpoint.keras"
LEGACY_STATE = "checkpoint.json"


@dataclasses.dataclass
class Progress:
    """Where in a run a checkpoint was written.

    Attributes:
        epoch: epochs finished.
        step: steps finished in epoch ``epoch`` (0 at an epoch boundary).
        steps_per_epoch: the run's epoch length in steps.
        metrics: the epoch's metric accumulators (``model.metrics_variables`` values), so a
            resumed epoch logs the mean over all its steps; empty at an epoch boundary.
        rng: ``{variable path: state}`` of the model's random-generator variables.
        metadata: what the writer added (``keras-pqcl pretrain``: the run's recipe).
        path: the file it was read from.
        layout: the whole-model layout it was written with (:data:`LAYOUT`).
    """

    epoch: int
    step: int
    steps_per_epoch: int
    metrics: list = dataclasses.field(default_factory=list)
    rng: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)
    path: str = ""
    layout: int = LAYOUT

    @property
    def global_step(self):
        return self.epoch * self.steps_per_epoch + self.step

    def describe(self):
        where = f"after epoch {self.epoch}" if not self.step else f"at step {self.step} of epoch {self.epoch + 1}"
        return f"{where} (step {self.global_step})"


def checkpoint_name(epoch, step):
    return _NAME.format(epoch=epoch, step=step)


def list_checkpoints(directory):
    """Checkpoint files in ``directory``, newest first (a 0.1 ``checkpoint.keras`` last)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME_RE.match(name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), os.path.join(directory, name)))
    paths = [path for _, path in sorted(found, reverse=True)]
    legacy = os.path.join(directory, LEGACY_FILE)
    return paths + ([legacy] if os.path.exists(legacy) else [])


def _random_states(model):
    """Variables ``model.save`` leaves out but a bit-exact resume needs: the seed-generator
    states of stochastic depth (and any other ``SeedGenerator``)."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


def _to_list(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable)).tolist()


def nonfinite_weights(model):
    """Paths of the model's floating-point weights holding NaN or infinity."""
    bad = []
    for variable in model.weights:
        if "float" not in str(variable.dtype):
            continue
        if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(variable), np.float32)).all():
            bad.append(variable.path)
    return bad


def _sync(model):
    # JAX keeps the training state outside the variables until the epoch ends.
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def save_checkpoint(model, directory, epoch, step, steps_per_epoch, metadata=None):
    """Write one checkpoint of ``model`` at (``epoch`` done, ``step`` done in the next), with
    ``metadata`` (a JSON-able dict) stored beside its progress.

    Raises:
        FloatingPointError: when a weight is not finite; nothing is written, so the previous
            checkpoints stay the newest.
    """
    _sync(model)
    bad = nonfinite_weights(model)
    if bad:
        raise FloatingPointError(_nonfinite_message(directory, epoch, step, bad))
    progress = {
        "format": FORMAT,
        "layout": LAYOUT,
        "epoch": int(epoch),
        "step": int(step),
        "steps_per_epoch": int(steps_per_epoch),
        "metrics": [_to_list(v) for v in model.metrics_variables] if step else [],
        "rng": {v.path: _to_list(v) for v in _random_states(model)},
        "metadata": dict(metadata or {}),
        "backend": keras.backend.backend(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = os.path.join(directory, checkpoint_name(epoch, step))

    def write(tmp):
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(PROGRESS_MEMBER, json.dumps(progress))
        with zipfile.ZipFile(tmp) as archive:  # read back before it may replace anything
            broken = archive.testzip()
            if broken is not None:
                raise OSError(f"checkpoint member {broken} did not read back; the disk may be full")

    atomic_write(path, write)
    return path


def _nonfinite_message(directory, epoch, step, bad):
    newest = list_checkpoints(directory)
    where = f"after epoch {epoch}" if not step else f"at step {step} of epoch {epoch + 1}"
    kept = (
        (
            f"The newest checkpoint, {newest[0]}, holds the last finite state: lower base_lr (or use float32) "
            "and continue with --resume."
        )
        if newest
        else "No checkpoint was written before it."
    )
    return (
        f"The weights stopped being finite {where} ({len(bad)} tensors, e.g. {bad[0]}), so no checkpoint "
        f"was written. {kept}"
    )


def read_progress(path, model=None):
    """The :class:`Progress` stored in checkpoint ``path``.

    A 0.1 ``checkpoint.keras`` has no progress member; its position is derived from the
    loaded ``model`` (optimizer step / the model's steps-per-epoch clock), which needs no
    ``checkpoint.json``.

    Raises:
        ValueError: the file is no keras_pqcl checkpoint or says nothing readable.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError("not a zip archive (truncated or damaged)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if PROGRESS_MEMBER in names:
            try:
                record = json.loads(archive.read(PROGRESS_MEMBER))
                return Progress(
                    epoch=int(record["epoch"]),
                    step=int(record["step"]),
                    steps_per_epoch=int(record["steps_per_epoch"]),
                    metrics=record.get("metrics", []),
                    rng=record.get("rng", {}),
                    metadata=record.get("metadata", {}),
                    path=path,
                    layout=int(record.get("layout", 1)),
                )
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"its {PROGRESS_MEMBER} is unreadable ({error})") from None
    if model is None:
        raise ValueError(f"no {PROGRESS_MEMBER} (not written by keras_pqcl >= 0.2)")
    steps_per_epoch = int(round(float(keras.ops.convert_to_numpy(model.schedules.steps_per_epoch))))
    global_step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    epoch, step = divmod(global_step, max(steps_per_epoch, 1))
    return Progress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, path=path)


def _load(path, kind=None):
    """``(model, progress)`` from one checkpoint file, or a ValueError saying why not.

    ``kind``: the model class the checkpoint must hold (None: a pre-training model)."""
    progress = None
    if os.path.basename(path) != LEGACY_FILE:
        progress = read_progress(path)
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a damaged or foreign file
        if progress is None or progress.layout < LAYOUT:
            raise ValueError(
                "it was written by keras_pqcl 0.1, whose whole-model layout this version no longer reads (the "
                "methods are now one model of loss terms); the run's teacher_backbone.keras and "
                "student_backbone.keras still load, so continue from one of those with --init-from in a new run"
            ) from None
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"Keras could not load it ({type(error).__name__}: {text[:300]})") from None
    if kind is not None and not isinstance(model, kind):
        raise ValueError(f"it holds a {type(model).__name__}, not a {kind.__name__}")
    if getattr(model, "optimizer", None) is None or (kind is None and not hasattr(model, "schedules")):
        raise ValueError(f"it holds a {type(model).__name__} without an optimizer, not a pre-training checkpoint")
    if progress is None:
        progress = read_progress(path, model)
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if iterations != progress.global_step:
        raise ValueError(f"its optimizer is at step {iterations} but its progress says {progress.global_step}")
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"{len(bad)} weight tensors are not finite (e.g. {bad[0]})")
    states = _random_states(model)
    saved = list(progress.rng.items())
    if len(saved) != len(states):
        by_path = {v.path: v for v in states}
        saved = [(name, value) for name, value in saved if name in by_path]
        states = [by_path[name] for name, _ in saved]
    # Otherwise by position (the model's own variable order): a generator's path holds a
    # process-wide counter, so a model loaded where another was built before has
    # ``seed_generator_1`` where the checkpoint says ``seed_generator``.
    for variable, (_, value) in zip(states, saved):
        variable.assign(np.asarray(value, dtype=str(variable.dtype)))
    return model, progress


def load_latest_checkpoint(directory, log=print, kind=None):
    """Load the newest checkpoint in ``directory`` that loads and is finite.

    Each file passed over is reported through ``log`` with the reason. ``kind``: the model
    class the checkpoints hold (None: a pre-training model; fine-tuning passes its own).

    Returns:
        ``(model, progress)``, or ``(None, None)`` when ``directory`` holds no checkpoint.

    Raises:
        ValueError: checkpoints exist but none loads; the message names each and why.
    """
    paths = list_checkpoints(directory)
    failures = []
    for path in paths:
        try:
            return _load(path, kind)
        except ValueError as error:
            failures.append(f"{path}: {error}")
            log(f"keras-pqcl: skipping checkpoint {path}: {error}")
    if not failures:
        return None, None
    raise ValueError(
        f"none of the {len(failures)} checkpoints in {directory} can be resumed from ("
        + "; ".join(failures)
        + "). Nothing was overwritten. Start a new run with another --output, or --overwrite to replace this one."
    )


def load_checkpoint(directory):
    """``(model, epochs_done)`` from the newest usable checkpoint in ``directory``, or
    ``(None, 0)`` when there is none (see :func:`load_latest_checkpoint`)."""
    model, progress = load_latest_checkpoint(directory, log=lambda message: None)
    return (model, progress.epoch) if model is not None else (None, 0)


class Checkpoint(keras.callbacks.Callback):
    """Save the whole pre-training model as a checkpoint file in ``directory``.

    A checkpoint is written at the end of every ``every``-th epoch and of the last epoch,
    and, for long epochs, every ``every_steps`` optimizer steps and/or every
    ``every_minutes`` minutes inside an epoch. Only the newest ``keep`` files are kept
    (older ones are deleted after the new one is in place). A model whose weights are not
    finite is never saved: the callback raises ``FloatingPointError`` instead, leaving the
    last finite checkpoint the newest.

    Args:
        directory: the checkpoint folder.
        every: epochs between end-of-epoch checkpoints (1).
        every_steps: optimizer steps between checkpoints inside an epoch (None: off).
        every_minutes: minutes between checkpoints inside an epoch (None: off).
        keep: checkpoints kept (2; at least 1).
        epochs: the run's length (the last epoch is always saved); None reads ``fit``'s.
        resume_from: the :class:`Progress` this ``fit`` resumes; a checkpoint written
            mid-epoch restores that epoch's metric sums when the epoch begins again (``fit``
            resets them first), so its logged means cover all its steps.
        metadata: a JSON-able dict stored in every checkpoint (the runner stores the recipe,
            so a resume can tell what the checkpoint was trained with).
        steps_per_epoch: the run's epoch length; None reads the model's own clock (the
            pre-training models' ``schedules.steps_per_epoch``), which other models do not have.
        write: False writes and prunes nothing, only restores a resumed epoch's metric sums:
            the callback of a multi-process run's processes other than the chief, whose
            metrics must match the chief's.
    """

    def __init__(
        self,
        directory,
        every=1,
        every_steps=None,
        every_minutes=None,
        keep=2,
        epochs=None,
        resume_from=None,
        metadata=None,
        steps_per_epoch=None,
        write=True,
    ):
        super().__init__()
        self.directory = directory
        self.write = bool(write)
        self.steps_per_epoch = steps_per_epoch
        self.every = max(int(every), 1)
        self.every_steps = int(every_steps) if every_steps else None
        self.every_minutes = float(every_minutes) if every_minutes else None
        self.keep = max(int(keep), 1)
        self.epochs = epochs
        self.resume_from = resume_from
        self.metadata = metadata
        self.last_path = None
        self._global_step = 0
        self._steps_per_epoch = 1
        self._last_save = time.monotonic()
        self._due = False

    def on_train_begin(self, logs=None):
        clock = self.steps_per_epoch or keras.ops.convert_to_numpy(self.model.schedules.steps_per_epoch)
        self._steps_per_epoch = int(round(float(clock)))
        self._global_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._last_save = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        resumed = self.resume_from
        if resumed is not None and resumed.step and epoch == resumed.epoch and resumed.metrics:
            for variable, value in zip(self.model.metrics_variables, resumed.metrics):
                variable.assign(np.asarray(value, dtype=str(variable.dtype)))
            self.resume_from = None

    def on_train_batch_end(self, batch, logs=None):
        self._global_step += 1
        if self.every_steps and self._global_step % self.every_steps == 0:
            self._due = True
        if self.every_minutes and time.monotonic() - self._last_save >= 60.0 * self.every_minutes:
            self._due = True
        epoch, step = divmod(self._global_step, self._steps_per_epoch)
        if self._due and step:  # at an epoch boundary on_epoch_end saves, after the epoch's logs
            self.save(epoch, step)

    def on_epoch_end(self, epoch, logs=None):
        total = self.epochs or (self.params or {}).get("epochs")
        if self._due or (epoch + 1) % self.every == 0 or (total is not None and epoch + 1 >= total):
            self.save(epoch + 1, 0)

    def save(self, epoch, step):
        """Write the checkpoint for (``epoch`` done, ``step`` done) and prune old ones."""
        from keras_pqcl.backend import process_local

        if not self.write:
            return
        # The writer alone saves: nothing in it may wait for the other processes.
        with process_local():
            self.last_path = save_checkpoint(
                self.model, self.directory, epoch, step, self._steps_per_epoch, self.metadata
            )
        self._due = False
        self._last_save = time.monotonic()
        for old in list_checkpoints(self.directory)[self.keep :]:
            os.remove(old)
        legacy_state = os.path.join(self.directory, LEGACY_STATE)
        if os.path.exists(legacy_state) and not os.path.exists(os.path.join(self.directory, LEGACY_FILE)):
            os.remove(legacy_state)


class NaNGuard(keras.callbacks.Callback):
    """Stop with a clear error when the loss stops being finite (the reference aborts too).

    Args:
        directory: the checkpoint folder, to name the newest checkpoint in the message.
    """

    def __init__(self, directory=None):
        super().__init__()
        self.directory = directory
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            newest = list_checkpoints(self.directory) if self.directory else []
            kept = (
                f"The newest checkpoint, {newest[0]}, holds the last finite state; continue from it "
                "with --resume once the cause is fixed."
                if newest
                else "No checkpoint was written yet."
            )
            raise FloatingPointError(
                f"The loss became {float(loss)} at batch {batch + 1} of epoch {self._epoch + 1}. Common "
                "causes: a learning rate too high for the batch size (lower base_lr), float16 overflow "
                "(use float32 or mixed_bfloat16), or norm_last_layer=False with a large model. " + kept
            )
