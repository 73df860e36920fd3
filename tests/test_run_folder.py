"""An output folder belongs to one run; checkpoints that cannot lie; a log that follows them.

Fast, in-process checks of the pieces. ``tests/test_resume.py`` kills whole runs.
"""

import builtins
import json
import os
import zipfile

import keras
import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl.callbacks import checkpoint as ckpt
from keras_pqcl.callbacks.epoch_log import EpochLog, read_rows
from keras_pqcl.io.files import TEMP_PREFIX, atomic_write
from keras_pqcl.recipe import Recipe
from keras_pqcl.run_folder import RunFolder, RunFolderError
from keras_pqcl.recipe import check_recipe, check_resume


# ------------------------------------------------------------------------- RunFolder
def test_new_run_refuses_a_folder_holding_another_run(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(RunFolderError, match="already holds a run.*--resume.*--output.*--overwrite"):
        with RunFolder(tmp_path):
            pass
    with RunFolder(tmp_path, resume=True):  # resuming it is fine
        pass


def test_overwrite_deletes_only_run_artefacts(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-e00001-s0000000.keras").write_bytes(b"x")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    messages = []
    with RunFolder(tmp_path, overwrite=True, log=messages.append):
        pass
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "run.lock"]
    assert "deleted the previous run's checkpoints, summary.json" in messages[0]
    with pytest.raises(RunFolderError, match="contradict"):
        RunFolder(tmp_path, resume=True, overwrite=True)


def test_output_that_is_a_file_or_unwritable_is_one_message(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    target.write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder(target).__enter__()
    with pytest.raises(RunFolderError, match="cannot create the output folder"):
        RunFolder(target / "sub").__enter__()

    real_open = builtins.open

    def refuse(path, *args, **kwargs):
        if ".write-test-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(RunFolderError, match="cannot write in the output folder.*Permission denied"):
        RunFolder(tmp_path / "ro").__enter__()


def test_lock_stops_a_second_run_and_a_stale_lock_is_taken_over(tmp_path):
    with RunFolder(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use by another running keras-pqcl run \\(pid"):
            with RunFolder(tmp_path / "run", resume=True):
                pass
    # A killed run leaves its line in run.lock but no OS lock: the next run takes over.
    (tmp_path / "run" / "run.lock").write_text("pid 1 on elsewhere since 2026-01-01")
    messages = []
    with RunFolder(tmp_path / "run", resume=True, log=messages.append):
        pass
    assert "no longer running (pid 1 on elsewhere" in messages[0]


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    leftover = tmp_path / "checkpoints" / f"{TEMP_PREFIX}abc.keras"
    leftover.write_bytes(b"half a checkpoint")
    with RunFolder(tmp_path, resume=True, log=lambda m: None) as folder:
        assert folder.removed == [str(leftover)]
    assert not leftover.exists()


def test_atomic_write_keeps_the_old_file_and_the_usual_permissions(tmp_path):
    path = str(tmp_path / "a.json")
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["a.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------- checkpoints
def _model():
    backbone = kp.backbones.vit(
        "vit_tiny", patch_size=8, image_size=16, embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.1
    )
    model = kp.models.DINO(backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    model.compile(optimizer=kp.optimizers.dino_adamw(8, 2, 4))
    model.configure_schedules(2, 4)
    return model


def test_checkpoints_keep_the_newest_and_carry_their_position(tmp_path):
    model = _model()
    directory = str(tmp_path)
    for epoch, step in [(0, 2), (1, 0), (1, 3)]:
        model.optimizer.iterations.assign(epoch * 4 + step)
        ckpt.save_checkpoint(model, directory, epoch, step, 4)
    callback = ckpt.Checkpoint(directory, keep=2)
    callback.set_model(model)
    callback.on_train_begin()
    model.optimizer.iterations.assign(8)
    callback.save(2, 0)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(directory)]
    assert names == ["checkpoint-e00002-s0000000.keras", "checkpoint-e00001-s0000003.keras"]
    progress = ckpt.read_progress(ckpt.list_checkpoints(directory)[1])
    assert (progress.epoch, progress.step, progress.steps_per_epoch, progress.global_step) == (1, 3, 4, 7)
    assert len(progress.metrics) == len(model.metrics_variables)
    assert progress.rng, "stochastic depth's seed state must travel with the checkpoint"


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    model = _model()
    first = ckpt.save_checkpoint(model, str(tmp_path), 1, 0, 4)
    variable = model.student_backbone.trainable_variables[0]
    variable.assign(np.full(variable.shape, np.nan, "float32"))
    with pytest.raises(FloatingPointError, match=r"after epoch 2.*newest checkpoint, .*e00001.*holds the last finite"):
        ckpt.save_checkpoint(model, str(tmp_path), 2, 0, 4)
    assert ckpt.list_checkpoints(str(tmp_path)) == [first]


def test_resume_skips_a_damaged_newest_checkpoint_and_names_it(tmp_path):
    model = _model()
    model.optimizer.iterations.assign(4)
    good = ckpt.save_checkpoint(model, str(tmp_path), 1, 0, 4)
    bad = os.path.join(str(tmp_path), ckpt.checkpoint_name(2, 0))
    with open(good, "rb") as f:
        open(bad, "wb").write(f.read()[:1000])  # truncated
    messages = []
    loaded, progress = ckpt.load_latest_checkpoint(str(tmp_path), log=messages.append)
    assert progress.path == good and progress.epoch == 1
    assert bad in messages[0] and "not a zip archive" in messages[0]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.teacher_backbone.weights[0]),
        keras.ops.convert_to_numpy(model.teacher_backbone.weights[0]),
    )

    os.remove(good)
    with pytest.raises(ValueError, match="none of the 1 checkpoints.*not a zip archive.*Nothing was overwritten"):
        ckpt.load_latest_checkpoint(str(tmp_path), log=lambda m: None)


def test_legacy_checkpoint_without_its_json_still_resumes(tmp_path):
    """0.1 wrote checkpoint.keras + checkpoint.json; a lost json no longer means 'from scratch'."""
    model = _model()
    model.optimizer.iterations.assign(8)
    model.save(str(tmp_path / "checkpoint.keras"))
    loaded, progress = ckpt.load_latest_checkpoint(str(tmp_path), log=lambda m: None)
    assert (progress.epoch, progress.step) == (2, 0)
    assert loaded is not None


def test_a_file_of_another_kind_is_skipped_with_its_reason(tmp_path):
    path = tmp_path / ckpt.checkpoint_name(1, 0)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(ckpt.PROGRESS_MEMBER, "{garbled")
    with pytest.raises(ValueError, match="keras_pqcl_progress.json is unreadable"):
        ckpt.load_latest_checkpoint(str(tmp_path), log=lambda m: None)


# ----------------------------------------------------------------------------- log
def test_epoch_log_cuts_back_to_the_checkpoint_and_adds_columns(tmp_path):
    path = str(tmp_path / "log.csv")
    log = EpochLog(path)
    log.on_epoch_end(0, {"loss": 2.0, "knn_top1": 10.0, "val_loss": 1.0})
    log.on_epoch_end(1, {"loss": 1.5})
    log.on_epoch_end(2, {"loss": 1.25})  # written, but the run died before its checkpoint
    resumed = EpochLog(path, start_epoch=2)
    resumed.on_epoch_end(2, {"loss": 1.2, "query": 0.5})
    rows = read_rows(path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["epoch", "loss", "knn_top1", "query"]
    assert [r["loss"] for r in rows] == ["2.0", "1.5", "1.2"]
    assert [r["knn_top1"] for r in rows] == ["10.0", "NA", "NA"] and rows[0]["query"] == "NA"


# -------------------------------------------------------------------------- recipes
def test_resume_names_every_setting_it_cannot_change():
    before = json.loads(Recipe(batch_size=64, seed=0).to_json())
    check_resume(before, Recipe(batch_size=64, seed=0, epochs=200, knn_every=5))  # may change
    with pytest.raises(ValueError, match=r"batch_size \(was 64, now 32\); seed \(was 0, now 1\)"):
        check_resume(before, Recipe(batch_size=32, seed=1))


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps_per_epoch", 0),
        ("epochs", 0),
        ("keep_checkpoints", 0),
        ("checkpoint_every_minutes", -1.0),
        ("batch_size", 1.5),
    ],
)
def test_recipe_values_no_run_can_use(field, value):
    with pytest.raises(ValueError, match=field):
        check_recipe(Recipe().replace(**{field: value}))
