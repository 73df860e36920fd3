"""``log.csv``: one row per finished epoch, consistent with the checkpoints after any crash."""

import csv
import io
import math
import os

import keras

from keras_pqcl.io.files import atomic_write_text

#: First columns, in this order; the rest follow sorted by name.
_LEADING = ("epoch", "loss")


def read_rows(path):
    """The rows of a log written by :class:`EpochLog` (or Keras' ``CSVLogger``) as dicts of
    strings, or ``[]`` when there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_log(csv_path):
    """``{column: [float per epoch]}`` from a ``log.csv`` (:class:`~keras_pqcl.callbacks.EpochLog`);
    ``NA`` cells (a k-NN column on epochs it was not evaluated) are NaN, so every column has
    one value per epoch."""
    columns = {}
    for row in read_rows(csv_path):
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                if value in ("NA", "", None):
                    columns.setdefault(key, []).append(float("nan"))
    return columns


def _cell(value):
    if value is None:
        return "NA"
    value = float(value)
    return "NA" if math.isnan(value) else repr(value)


class EpochLog(keras.callbacks.Callback):
    """Write every epoch's logs to a CSV file, rewritten whole and atomically each epoch.

    Unlike ``keras.callbacks.CSVLogger`` it never loses or repeats a row and never shifts
    a column:

    * the file is replaced atomically, so a kill leaves the previous epoch's complete file;
    * ``start_epoch`` (the epochs a resumed checkpoint holds) cuts rows of later epochs,
      written before a crash that the checkpoint does not hold, so they are written again;
    * the columns are the union of every epoch's keys: a metric that appears later (a k-NN
      score every few epochs, an option changed on resume) gets its own column, ``NA``
      where it was not logged;
    * Keras' validation keys (``val_*``), always empty in pre-training, are left out unless
      ``validation=True`` (fine-tuning, which validates every epoch).

    Args:
        path: the CSV file.
        start_epoch: epochs already done (0 for a new run); earlier rows are kept.
        validation: keep the ``val_*`` columns.
    """

    def __init__(self, path, start_epoch=0, validation=False):
        super().__init__()
        self.path = path
        self.validation = validation
        self.rows = [row for row in read_rows(path) if _epoch(row) < start_epoch]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": str(epoch)}
        for key, value in (logs or {}).items():
            if self.validation or not key.startswith("val_"):
                row[key] = _cell(value)
        self.rows = [r for r in self.rows if _epoch(r) < epoch] + [row]
        self.write()

    def write(self):
        keys = {key for row in self.rows for key in row}
        columns = [k for k in _LEADING if k in keys] + sorted(keys - set(_LEADING))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="NA", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())


def _epoch(row):
    try:
        return int(float(row.get("epoch", "")))
    except ValueError:
        return -1
