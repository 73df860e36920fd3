"""The CLI and the recipe runner end to end, on a very small recipe."""

import json
import os

import keras
import numpy as np
import pytest

from keras_pqcl import cli
from keras_pqcl.callbacks.checkpoint import read_progress
from keras_pqcl.recipe import Recipe, available_recipes, load_recipe

RECIPE = """
from keras_pqcl.recipe import Recipe

def get_recipe():
    return Recipe(
        name="micro", method="dino", backbone="vit_tiny", patch_size=8, drop_path_rate=0.1,
        backbone_args=dict(embed_dim=32, depth=1, num_heads=2),
        method_args=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
        data="synthetic_scenes:16",
        crops=dict(global_size=16, local_size=8, n_local=2),
        batch_size=8, epochs=2, warmup_epochs=1, precision="{precision}",
    )
"""


@pytest.fixture
def recipe_file(tmp_path):
    def make(precision="float32"):
        path = tmp_path / f"micro_{precision}.py"
        path.write_text(RECIPE.format(precision=precision))
        return str(path)

    yield make
    keras.mixed_precision.set_dtype_policy("float32")


def test_bundled_recipes_load():
    names = available_recipes()
    assert {"tiny", "dino_vit_small"} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown recipe 'nope'.*tiny"):
        load_recipe("nope")


def test_pretrain_writes_artefacts_and_resumes(recipe_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["pretrain", "--recipe", recipe_file(), "--output", out, "--quiet"]) == 0
    for name in (
        "teacher_backbone.keras",
        "student_backbone.keras",
        "log.csv",
        "loss.png",
        "recipe.json",
        "summary.json",
        "checkpoints/checkpoint-e00002-s0000000.keras",
    ):
        assert os.path.exists(os.path.join(out, name)), name
    assert "Done." in capsys.readouterr().out
    progress = read_progress(os.path.join(out, "checkpoints", "checkpoint-e00002-s0000000.keras"))
    assert (progress.epoch, progress.step, progress.global_step) == (2, 0, 4)

    backbone = keras.saving.load_model(os.path.join(out, "teacher_backbone.keras"))
    features = backbone(np.zeros((1, 16, 16, 3), "float32"))
    assert tuple(features["cls"].shape) == (1, 32)

    # Resume for one more epoch: the step counter and the log continue; the resume line
    # shows even with --quiet.
    assert (
        cli.main(["pretrain", "--recipe", recipe_file(), "--output", out, "--epochs", "3", "--resume", "--quiet"]) == 0
    )
    assert "resuming from" in capsys.readouterr().out
    progress = read_progress(os.path.join(out, "checkpoints", "checkpoint-e00003-s0000000.keras"))
    assert progress.global_step == 6
    with open(os.path.join(out, "log.csv")) as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["0", "1", "2"]


def test_mixed_bfloat16_trains_with_float32_loss(recipe_file, tmp_path):
    out = str(tmp_path / "bf16")
    cli.main(["pretrain", "--recipe", recipe_file("mixed_bfloat16"), "--output", out, "--quiet"])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert np.isfinite(summary["last_loss"])
    model = keras.saving.load_model(summary["checkpoint"])
    assert model.student_backbone.compute_dtype == "bfloat16"
    assert model.term("cls").center.dtype == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_bad_output_checkpoint_is_a_clear_error(recipe_file, tmp_path, capsys):
    out = tmp_path / "broken"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-e00001-s0000000.keras").write_bytes(b"not a zip")
    assert cli.main(["pretrain", "--recipe", recipe_file(), "--output", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 checkpoints" in err and "checkpoint-e00001-s0000000.keras: not a zip archive" in err
    assert (out / "checkpoints" / "checkpoint-e00001-s0000000.keras").read_bytes() == b"not a zip"


def test_empty_data_folder_is_a_clear_error(recipe_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["pretrain", "--recipe", recipe_file(), "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps-per-epoch", "0"], "steps_per_epoch must be a whole number >= 1"),
        (["--batch-size", "64"], "fewer than batch_size=64"),
        (["--resume", "--overwrite"], "contradict each other"),
    ],
)
def test_bad_options_are_one_line(recipe_file, tmp_path, capsys, args, message):
    argv = ["pretrain", "--recipe", recipe_file(), "--output", str(tmp_path / "o"), "--quiet", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


#: the variable of each backend's own multi-process launch.
OWN_LAUNCH = {"torch": "WORLD_SIZE", "jax": "KERAS_PQCL_NUM_PROCESSES", "tensorflow": "TF_CONFIG"}


@pytest.mark.parametrize(
    "variable,value",
    [
        ("KERAS_PQCL_NUM_PROCESSES", "2"),
        ("WORLD_SIZE", "2"),
        (
            "TF_CONFIG",
            '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}',
        ),
    ],
)
def test_another_backends_multi_process_launch_is_refused(recipe_file, tmp_path, capsys, monkeypatch, variable, value):
    backend = keras.backend.backend()
    if OWN_LAUNCH[backend] == variable:
        pytest.skip(f"{variable} is {backend}'s own launch")
    monkeypatch.setenv(variable, value)
    argv = ["pretrain", "--recipe", recipe_file(), "--output", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{variable} asks for several processes, which the {backend} backend does not read" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_the_jax_launch_flags_elsewhere_or_without_a_coordinator_are_one_line(recipe_file, tmp_path, capsys):
    argv = ["pretrain", "--recipe", recipe_file(), "--output", str(tmp_path / "o"), "--quiet", "--num-processes", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if keras.backend.backend() == "jax":
        assert "needs the coordinator HOST:PORT" in err, err
    else:
        assert "--coordinator/--num-processes/--process-id start a JAX run" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("WORLD_SIZE", "abc", "must be an integer"),
        ("KERAS_PQCL_NUM_PROCESSES", "two", "must be an integer"),
        ("TF_CONFIG", "[]", "is not JSON of the form"),
    ],
)
def test_a_malformed_launch_variable_is_one_line(recipe_file, tmp_path, capsys, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert cli.main(["pretrain", "--recipe", recipe_file(), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{variable}={value!r} {message}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_readme_api_names_are_public():
    import keras_pqcl as kp

    for name in (
        "backbones.vit_small",
        "models.DINO",
        "optimizers.dino_adamw",
        "data.MultiCropConfig",
        "data.pretrain_dataset",
        "data.steps_per_epoch",
        "Recipe",
        "pretrain",
        "models.IBOT",
        "models.PQCL",
        "models.ADCLR",
        "callbacks.CollapseGuard",
        "data.MaskConfig",
        "data.QueryConfig",
        "load_recipe",
    ):
        obj = kp
        for part in name.split("."):
            obj = getattr(obj, part)
