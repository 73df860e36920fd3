"""Load a saved backbone: the documented way to read the ``.keras`` files of ``keras-pqcl``.

``keras.saving.load_model`` on a saved backbone in a process that has not imported
``keras_pqcl`` fails with Keras' generic "Could not locate class 'VisionTransformer'", and a
damaged file is reported as "File not found" although it exists. Plain Keras calls cannot be
intercepted, so :func:`load_backbone` is the entry point that registers the classes first and
says what is wrong with the file.
"""

import json
import os
import re
import zipfile

USES = ("teacher", "student")
# Keras' deserialisation errors embed the whole object config; one line of it is enough.
_MAX_ERROR_CHARS = 400


def load_backbone(path, use="teacher"):
    """The backbone saved in ``path``, ready for ``forward_features``.

    Use this instead of ``keras.saving.load_model``: it imports ``keras_pqcl`` so that its
    classes (``VisionTransformer``, ``ResNet``, the heads and models) are registered, and it
    turns a missing, damaged or unrelated file into one-line errors that name the file.

    Args:
        path: a ``.keras`` file holding a backbone (``teacher_backbone.keras`` written by
            ``keras-pqcl pretrain``) or a whole self-supervised model (a checkpoint).
        use: ``"teacher"`` or ``"student"``: which backbone to take from a whole model;
            ignored for a backbone file.

    Returns:
        The backbone (a ``keras.Model`` with ``forward_features``, e.g. ``VisionTransformer``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, not a ``.keras`` zip archive, lacks the model
            config, cannot be deserialised, or holds a model that is neither a backbone nor
            a self-supervised model with a ``{use}_backbone``.
    """
    path = os.fspath(path)
    if use not in USES:
        raise ValueError(f"use={use!r}: pick one of {', '.join(map(repr, USES))}.")
    check_archive(path)
    import keras

    import keras_pqcl  # noqa: F401  (registers the classes load_model needs)

    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # a zip/JSON/class error: the file, not the code, is at fault
        if _is_old_layout(path):
            raise ValueError(
                f"{path!r} is a whole-model checkpoint written by keras_pqcl 0.1, whose model layout this version no "
                f"longer reads; use that run's {use}_backbone.keras instead (0.1 backbones load unchanged)."
            ) from None
        reason = f"{type(error).__name__}: {_one_line(error)}"
        raise ValueError(f"could not load {path!r} as a Keras model: {reason}") from None
    if hasattr(model, "forward_features"):
        return model
    backbone = getattr(model, f"{use}_backbone", None)
    if backbone is None:
        raise ValueError(
            f"{path!r} holds a {type(model).__name__}, neither a ViT backbone nor a self-supervised model with a "
            f"{use}_backbone; pass the teacher_backbone.keras that `keras-pqcl pretrain` writes."
        )
    return backbone


#: The self-distillation models, whose whole-model layout changed in 0.2 (loss terms).
_TERM_MODELS = ("DINO", "IBOT", "PQCL", "ADCLR")


def _is_old_layout(path):
    """A checkpoint of one of :data:`_TERM_MODELS` written before the loss-term layout (its
    progress record has no ``layout`` 2, or it has none: 0.1's ``checkpoint.keras``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if json.loads(archive.read("config.json")).get("class_name") not in _TERM_MODELS:
                return False
            if "keras_pqcl_progress.json" not in archive.namelist():
                return True
            return int(json.loads(archive.read("keras_pqcl_progress.json")).get("layout", 1)) < 2
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return False


def check_archive(path):
    """Name what is wrong with ``path`` before Keras does: it reports a damaged file as missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path!r} (a .keras file written by `keras-pqcl pretrain`)")
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith(".keras"))
        hint = f", e.g. {os.path.join(path, inside[0])!r}" if inside else ""
        raise ValueError(f"{path!r} is a directory, not a .keras file; pass the file itself{hint}.")
    if path.lower().endswith((".h5", ".hdf5")):
        return  # legacy HDF5 models are no zip; Keras reads and reports on those itself
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r} (permission denied); check the file's permissions.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"could not load {path!r}: it is not a .keras file (not a zip archive): damaged or wrong file; "
            "copy it again or re-save it with model.save('name.keras')."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"could not load {path!r}: damaged zip archive ({_one_line(error)}); copy it again.") from None
    if "config.json" not in names:
        raise ValueError(
            f"could not load {path!r}: it is a zip archive without config.json, so not a .keras model; "
            "pass the .keras file that model.save or `keras-pqcl pretrain` wrote."
        )


def _one_line(error):
    text = re.sub(r"\s+", " ", str(error)).strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
