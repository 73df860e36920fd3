"""Atomic checkpoints that training can resume from, and a clear stop on NaN."""

import json
import math
import os
import tempfile

import keras

CHECKPOINT_FILE = "checkpoint.keras"
STATE_FILE = "checkpoint.json"


def _atomic_write(path, write):
    """Write through ``write(tmp_path)`` to a temporary file, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact: ``os.replace`` is atomic on
    POSIX and Windows when both paths are on one file system.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (see :func:`_atomic_write`)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


class Checkpoint(keras.callbacks.Callback):
    """Save the whole pre-training model (student, teacher, heads, centers, optimizer and
    step) every ``every`` epochs and at the end, atomically, to ``directory``.

    ``checkpoint.keras`` holds the model; ``checkpoint.json`` the number of finished epochs.
    Resume with :func:`load_checkpoint` and ``fit(..., initial_epoch=epochs_done)``.
    """

    def __init__(self, directory, every=1):
        super().__init__()
        self.directory = directory
        self.every = max(int(every), 1)

    def _save(self, epochs_done):
        path = os.path.join(self.directory, CHECKPOINT_FILE)
        _atomic_write(path, lambda tmp: self.model.save(tmp))
        state = json.dumps({"epochs_done": epochs_done, "step": int(self.model.optimizer.iterations)})
        atomic_write_text(os.path.join(self.directory, STATE_FILE), state)

    def on_epoch_end(self, epoch, logs=None):
        total = self.params.get("epochs") if self.params else None
        if (epoch + 1) % self.every == 0 or (total is not None and epoch + 1 == total):
            self._save(epoch + 1)


def load_checkpoint(directory):
    """Return ``(model, epochs_done)`` from a :class:`Checkpoint` directory, or ``(None, 0)``."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path) or not os.path.exists(state_path):
        return None, 0
    with open(state_path) as f:
        state = json.load(f)
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # a checkpoint of another architecture or a damaged file
        raise ValueError(
            f"Could not restore the checkpoint {path}: {error}. It was written by a different "
            "recipe or keras_pqcl version, or is damaged; start a new --output directory or "
            "drop --resume."
        ) from error
    return model, int(state["epochs_done"])


class NaNGuard(keras.callbacks.Callback):
    """Stop with a clear error when the loss stops being finite (the reference aborts too)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"The loss became {float(loss)} at batch {batch} of this epoch. Common causes: a "
                "learning rate too high for the batch size (lower base_lr), float16 overflow "
                "(use float32 or mixed_bfloat16), or norm_last_layer=False with a large model. "
                "The last checkpoint, if any, holds the last finite state."
            )
