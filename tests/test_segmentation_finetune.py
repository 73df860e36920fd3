"""``finetune_segmentation``: checkpoints and a resume that ends where an uninterrupted run ends."""

import os
import shutil

import keras
import numpy as np

from keras_pqcl.callbacks.checkpoint import list_checkpoints
from keras_pqcl.callbacks.epoch_log import read_rows
from keras_pqcl.data.synthetic import synthetic_scenes
from keras_pqcl.tasks.finetune_run import finetune_segmentation
from tests.helpers import IGNORE_NUMPY2_COPY_WARNING, to_numpy
from tests.test_segmentation import numpy_init, shape_only_init, tiny_vit

pytestmark = IGNORE_NUMPY2_COPY_WARNING


def split(n, seed):
    data = synthetic_scenes(n, image_size=32, num_classes=2, seed=seed)
    return {"images": data["images"], "masks": data["masks"]}


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

    a = keras.saving.load_model(str(tmp_path / "straight" / "segmenter.keras"))
    b = keras.saving.load_model(str(tmp_path / "resumed" / "segmenter.keras"))
    assert len(a.weights) == len(b.weights)
    moved = 0.0
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(to_numpy(wb), to_numpy(wa), atol=1e-5, err_msg=wa.path)
    for wa, w0 in zip(
        a.weights, keras.saving.load_model(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]).weights
    ):
        moved = max(moved, float(np.abs(to_numpy(wa) - to_numpy(w0)).max()))
    assert moved > 1e-3  # epochs 3 and 4 did train
    np.testing.assert_allclose(resumed["val"]["mIoU"], straight["val"]["mIoU"], atol=1e-5)
    rows = read_rows(str(tmp_path / "resumed" / "log.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and "val_mIoU" in rows[0]
    straight_rows = read_rows(str(tmp_path / "straight" / "log.csv"))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [float(r["loss"]) for r in straight_rows], rtol=1e-4)
    assert os.path.exists(tmp_path / "resumed" / "loss.png")
