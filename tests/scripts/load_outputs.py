"""Load saved ``.keras`` files under this process's backend and write their outputs.

Usage (KERAS_BACKEND chosen by the caller)::

    python tests/scripts/load_outputs.py OUT.npz IMAGES.npy backbone=PATH dino=PATH

For ``backbone=PATH`` (a saved VisionTransformer) it writes ``backbone_cls`` and
``backbone_patches``; for ``dino=PATH`` (a saved DINO) ``dino_teacher_cls``,
``dino_teacher_patches``, ``dino_student_cls`` and ``dino_center``. Importing keras_pqcl
registers the classes, so plain ``keras.saving.load_model`` is used.
"""

import sys

import keras
import numpy as np
from keras import ops

import keras_pqcl  # noqa: F401  (registers the serializable classes)


def main(out_path, images_path, *specs):
    images = np.load(images_path)
    out = {"backend": np.array(keras.backend.backend())}
    for spec in specs:
        kind, path = spec.split("=", 1)
        model = keras.saving.load_model(path)
        if kind == "backbone":
            features = model(images, training=False)
            out["backbone_cls"] = ops.convert_to_numpy(features["cls"])
            out["backbone_patches"] = ops.convert_to_numpy(features["patches"])
        elif kind == "dino":
            features = model.teacher_backbone(images, training=False)
            out["dino_teacher_cls"] = ops.convert_to_numpy(features["cls"])
            out["dino_teacher_patches"] = ops.convert_to_numpy(features["patches"])
            out["dino_student_cls"] = ops.convert_to_numpy(model(images, training=False))
            out["dino_center"] = ops.convert_to_numpy(model.term("cls").center)
        else:
            raise SystemExit(f"unknown kind {kind!r}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
