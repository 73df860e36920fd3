"""Saving, loading and resuming DINO training on the current backend (and across backends).

Cross-backend loads run ``tests/scripts/load_outputs.py`` in a subprocess per other backend.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_pqcl as kp
from tests.scripts import tiny_setup as ts

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

BACKEND = keras.backend.backend()
EPOCHS, STEPS = 2, 2


def _np(x):
    return np.array(ops.convert_to_numpy(x))


def _compile(model):
    model.compile(optimizer=kp.optimizers.dino_adamw(ts.BATCH, EPOCHS, STEPS, base_lr=0.064, warmup_epochs=1))


def _state(model):
    """Every model and optimizer variable: ``[(path, value)]`` in tracking order; the
    auto-generated names of the model and of its CLS loss (``dino``, ``dino_1``, ...;
    ``dino_loss``, ``dino_loss_1``, ...) are normalised."""
    variables = list(model.weights) + list(model.optimizer.variables)
    return [(re.sub(r"^(dino|dino_loss)(_\d+)?/", r"\1/", v.path), _np(v)) for v in variables]


def _assert_same_state(actual, expected, atol=0.0):
    assert [p for p, _ in actual] == [p for p, _ in expected]
    for (path, a), (_, b) in zip(actual, expected):
        assert a.shape == b.shape, path
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=path)


def _outputs(model, images):
    teacher = model.teacher_backbone(images, training=False)
    student = model.student_backbone(images, training=False)
    return dict(
        teacher_cls=_np(teacher["cls"]),
        teacher_patches=_np(teacher["patches"]),
        student_cls=_np(student["cls"]),
        student_patches=_np(student["patches"]),
        teacher_head=_np(model.teacher_head(teacher["cls"])),
        student_head=_np(model.student_head(student["cls"])),
        call=_np(model(images, training=False)),
    )


@pytest.fixture(scope="module")
def data():
    # Global crops only: local crops add nothing to what is saved, and double the compile time.
    return ts.crops(8, n_local=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An uninterrupted 2-epoch run (2 steps each), saved as .keras; also the reference of
    the resume test."""
    keras.utils.set_random_seed(0)
    model = ts.dino(teacher_momentum=0.9)
    _compile(model)
    model.fit(ts.dataset(data), epochs=EPOCHS, verbose=0)
    folder = tmp_path_factory.mktemp("saved")
    path = str(folder / "dino.keras")
    model.save(path)
    backbone_path = str(folder / "backbone.keras")
    model.teacher_backbone.save(backbone_path)
    return dict(model=model, path=path, backbone_path=backbone_path, folder=folder)


def test_dino_keras_round_trip(trained):
    model = trained["model"]
    loaded = keras.saving.load_model(trained["path"])
    assert isinstance(loaded, kp.models.DINO)
    assert isinstance(loaded.optimizer, kp.optimizers.AdamW)
    # Student, teacher, heads, center, clock and momentum range, optimizer slots/iterations.
    _assert_same_state(_state(loaded), _state(model))
    assert int(_np(loaded.optimizer.iterations)) == EPOCHS * STEPS
    assert float(_np(loaded.schedules.steps_per_epoch)) == STEPS
    assert float(_np(loaded.schedules.total_steps)) == EPOCHS * STEPS
    assert float(_np(loaded.schedules.momentum[0])) == pytest.approx(0.9)
    center = _np(loaded.term("cls").center)
    assert np.abs(center).max() > 0
    np.testing.assert_array_equal(center, _np(model.term("cls").center))
    # Teacher and student really differ after training, so the comparison below is meaningful.
    images = ts.probe_images()
    expected = _outputs(model, images)
    assert np.abs(expected["teacher_cls"] - expected["student_cls"]).max() > 1e-5
    for name, value in _outputs(loaded, images).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    config = loaded.get_config()
    assert config["out_dim"] == ts.HEAD["out_dim"] and config["teacher_momentum"] == pytest.approx(0.9)


def test_backbone_alone_round_trip(trained):
    teacher = trained["model"].teacher_backbone
    loaded = keras.saving.load_model(trained["backbone_path"])
    assert isinstance(loaded, kp.backbones.VisionTransformer)
    assert loaded.drop_path_rate == 0.0 and loaded.embed_dim == 32 and loaded.depth == 2
    images = ts.probe_images()
    expected, actual = teacher(images, training=False), loaded(images, training=False)
    for key in ("cls", "patches"):
        np.testing.assert_allclose(_np(actual[key]), _np(expected[key]), rtol=1e-6, atol=1e-6, err_msg=key)
    # Other input sizes go through the interpolated position table identically.
    small = ts.probe_images()[:, :16, :16]
    np.testing.assert_allclose(_np(loaded(small)["cls"]), _np(teacher(small)["cls"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("other", ["tensorflow", "jax", "torch"])
def test_load_under_other_backend(trained, other):
    if other == BACKEND:
        pytest.skip("same backend: covered by the round-trip tests")
    folder = trained["folder"]
    images = ts.probe_images()
    images_path = str(folder / f"images_{other}.npy")
    np.save(images_path, images)
    out_path = str(folder / f"outputs_{other}.npz")
    env = dict(
        os.environ,
        KERAS_BACKEND=other,
        PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
    )
    cmd = [
        sys.executable,
        os.path.join(HERE, "scripts", "load_outputs.py"),
        out_path,
        images_path,
        f"backbone={trained['backbone_path']}",
        f"dino={trained['path']}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = np.load(out_path)
    assert str(out["backend"]) == other
    model = trained["model"]
    teacher = model.teacher_backbone(images, training=False)
    expected = dict(
        backbone_cls=teacher["cls"],
        backbone_patches=teacher["patches"],
        dino_teacher_cls=teacher["cls"],
        dino_teacher_patches=teacher["patches"],
        dino_student_cls=model(images, training=False),
        dino_center=model.term("cls").center,
    )
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], _np(value), rtol=0, atol=1e-5, err_msg=f"{name} on {other}")


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError(f"interrupted at epoch {epoch}")


def test_backup_and_restore_resumes_exactly(trained, data, tmp_path):
    backup_dir = str(tmp_path / "backup")
    ds = ts.dataset(data)

    keras.utils.set_random_seed(0)
    first = ts.dino(teacher_momentum=0.9)
    _compile(first)
    with pytest.raises(RuntimeError, match="interrupted at epoch 1"):
        first.fit(
            ds,
            epochs=EPOCHS,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir), Interrupt(1)],
        )
    assert os.path.exists(os.path.join(backup_dir, "latest.weights.h5"))

    # A fresh process would build a fresh model: other initial weights on purpose.
    keras.utils.set_random_seed(123)
    resumed = ts.dino(teacher_momentum=0.9)
    _compile(resumed)
    history = resumed.fit(ds, epochs=EPOCHS, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup_dir)])
    assert history.epoch == [1]  # only the missing epoch ran
    reference = trained["model"]
    assert int(_np(resumed.optimizer.iterations)) == EPOCHS * STEPS
    # Student, teacher, center, clock, Adam moments and step counter as if never interrupted.
    _assert_same_state(_state(resumed), _state(reference), atol=1e-5)
