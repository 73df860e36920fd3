"""The CLI and the recipe runner end to end, on a very small recipe."""

import json
import os

import keras
import numpy as np
import pytest

from keras_pqcl import cli
from keras_pqcl.recipe import Recipe, available_recipes, load_recipe

RECIPE = '''
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
'''


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
    for name in ("teacher_backbone.keras", "student_backbone.keras", "log.csv", "loss.png",
                 "recipe.json", "summary.json", "checkpoints/checkpoint.keras"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "Done." in capsys.readouterr().out
    with open(os.path.join(out, "checkpoints", "checkpoint.json")) as f:
        state = json.load(f)
    assert state == {"epochs_done": 2, "step": 4}

    backbone = keras.saving.load_model(os.path.join(out, "teacher_backbone.keras"))
    features = backbone(np.zeros((1, 16, 16, 3), "float32"))
    assert tuple(features["cls"].shape) == (1, 32)

    # Resume for one more epoch: the step counter and the log continue.
    assert cli.main(["pretrain", "--recipe", recipe_file(), "--output", out, "--epochs", "3",
                     "--resume", "--quiet"]) == 0
    with open(os.path.join(out, "checkpoints", "checkpoint.json")) as f:
        assert json.load(f) == {"epochs_done": 3, "step": 6}
    with open(os.path.join(out, "log.csv")) as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["0", "1", "2"]


def test_mixed_bfloat16_trains_with_float32_loss(recipe_file, tmp_path):
    out = str(tmp_path / "bf16")
    cli.main(["pretrain", "--recipe", recipe_file("mixed_bfloat16"), "--output", out, "--quiet"])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert np.isfinite(summary["last_loss"])
    model = keras.saving.load_model(os.path.join(out, "checkpoints", "checkpoint.keras"))
    assert model.student_backbone.compute_dtype == "bfloat16"
    assert model.dino_loss.center.dtype == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_bad_output_checkpoint_is_a_clear_error(recipe_file, tmp_path, capsys):
    out = tmp_path / "broken"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint.keras").write_bytes(b"not a zip")
    (out / "checkpoints" / "checkpoint.json").write_text('{"epochs_done": 1, "step": 2}')
    assert cli.main(["pretrain", "--recipe", recipe_file(), "--output", str(out), "--resume", "--quiet"]) == 2
    assert "Could not restore the checkpoint" in capsys.readouterr().err


def test_empty_data_folder_is_a_clear_error(recipe_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["pretrain", "--recipe", recipe_file(), "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "no image files found" in capsys.readouterr().err


def test_readme_api_names_are_public():
    import keras_pqcl as kp

    for name in ("backbones.vit_small", "models.DINO", "optimizers.dino_adamw", "callbacks.TeacherEMA",
                 "data.MultiCropConfig", "data.pretrain_dataset", "data.steps_per_epoch", "Recipe", "pretrain",
                 "models.IBOT", "models.PQCL", "models.ADCLR", "callbacks.CollapseGuard", "data.MaskConfig",
                 "data.QueryConfig", "load_recipe"):
        obj = kp
        for part in name.split("."):
            obj = getattr(obj, part)
