"""``finetune_segmentation``: checkpoints and a resume that ends where an uninterrupted run ends."""

import io
import os
import shutil
import zipfile

import h5py
import numpy as np

from keras_pqcl.callbacks.checkpoint import list_checkpoints
from keras_pqcl.callbacks.epoch_log import read_rows
from keras_pqcl.data.synthetic import synthetic_scenes
from keras_pqcl.tasks.finetune_run import finetune_segmentation
from tests.helpers import IGNORE_NUMPY2_COPY_WARNING
from tests.test_segmentation import numpy_init, shape_only_init, tiny_vit

pytestmark = IGNORE_NUMPY2_COPY_WARNING


def split(n, seed):
    data = synthetic_scenes(n, image_size=32, num_classes=2, seed=seed)
    return {"images": data["images"], "masks": data["masks"]}


def saved_variables(path):
    """``{h5 path: array}`` of every variable in a ``.keras`` file."""
    found = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
        f.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


def run(output, **kwargs):
    with shape_only_init():
        backbone = tiny_vit()
    numpy_init(backbone, np.random.default_rng(0))
    # fpn: its dropout draws random numbers every step, which a resume must continue.
    args = dict(decoder="fpn", channels=8, epochs=4, batch_size=4, lr=3e-3, seed=5, verbose=0, num_predictions=2)
    return finetune_segmentation(backbone, split(8, 1), split(4, 2), 3, str(output), **{**args, **kwargs})


def test_resume_from_epoch_2_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "straight", keep_checkpoints=4)
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "straight" / "checkpoints")] == [
        f"checkpoint-e{e:05d}-s0000000.keras" for e in (4, 3, 2, 1)
    ]
    # The folder of a run stopped after its second epoch: checkpoints 1 and 2, four log rows
    # of which the last two (written before the stop by a run that got further) are cut.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for name in ("checkpoints/checkpoint-e00003-s0000000.keras", "checkpoints/checkpoint-e00004-s0000000.keras"):
        os.remove(tmp_path / "resumed" / name)
    for name in ("segmenter.keras", "summary.json", "predictions.png", "loss.png"):
        os.remove(tmp_path / "resumed" / name)
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-e00002-s0000000.keras")

    # Compared as saved (weights, optimizer moments and step), without building two models.
    final = saved_variables(tmp_path / "straight" / "segmenter.keras")
    again = saved_variables(tmp_path / "resumed" / "segmenter.keras")
    assert sorted(final) == sorted(again) and any("optimizer" in k for k in final)
    for key, value in final.items():
        np.testing.assert_allclose(again[key], value, atol=1e-5, err_msg=key)
    at_2 = saved_variables(tmp_path / "straight" / "checkpoints" / "checkpoint-e00002-s0000000.keras")
    assert max(float(np.abs(final[k] - at_2[k]).max()) for k in final if "classifier" in k) > 1e-3  # 3 and 4 trained
    np.testing.assert_allclose(resumed["val"]["mIoU"], straight["val"]["mIoU"], atol=1e-5)
    rows = read_rows(str(tmp_path / "resumed" / "log.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and "val_mIoU" in rows[0]
    straight_rows = read_rows(str(tmp_path / "straight" / "log.csv"))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [float(r["loss"]) for r in straight_rows], rtol=1e-4)
    assert os.path.exists(tmp_path / "resumed" / "loss.png")
