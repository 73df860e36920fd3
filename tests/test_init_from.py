"""Continued pre-training: ``Recipe.init_from`` / ``keras-pqcl pretrain --init-from FILE``."""

import json
import os

import keras
import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl import cli
from keras_pqcl.io.init_from import init_backbone_from
from keras_pqcl.recipe import Recipe
from keras_pqcl.training import build_model

TINY = dict(embed_dim=32, depth=1, num_heads=2)
MICRO = Recipe(
    name="micro",
    method="dino",
    backbone="vit_tiny",
    patch_size=8,
    drop_path_rate=0.1,
    backbone_args=TINY,
    method_args=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
    data="synthetic_scenes:16",
    crops=dict(global_size=16, local_size=8, n_local=1),
    batch_size=8,
    epochs=1,
    steps_per_epoch=1,
    warmup_epochs=1,
    knn_every=0,
)
# The same recipe as a file for the CLI. base_lr=0 (and so no decoupled weight decay either):
# the one training step moves no weight, so the saved backbones still hold the file's.
RECIPE_FILE = """
from keras_pqcl.recipe import Recipe

def get_recipe():
    return Recipe(**{recipe!r})
"""


def save_backbone(path, seed=3, image_size=16, pos_embed="learned", **sizes):
    keras.utils.set_random_seed(seed)
    backbone = kp.backbones.vit_tiny(8, image_size=image_size, pos_embed=pos_embed, **{**TINY, **sizes})
    backbone.save(str(path))
    return backbone


def weights(backbone):
    """``{path inside the backbone: array}`` (no seed states)."""
    return {
        v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v)
        for v in backbone.weights
        if "seed_generator" not in v.path
    }


def assert_same(actual, expected, atol=0.0):
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_student_and_teacher_start_from_the_file(tmp_path, method):
    path = tmp_path / "teacher_backbone.keras"
    expected = weights(save_backbone(path))
    recipe = MICRO.replace(method=method, init_from=str(path))
    model = build_model(recipe, 1, 16)
    for backbone in (model.student_backbone, model.teacher_backbone):
        got = weights(backbone)
        if method == "ibot":
            # DINO has no mask token: the iBOT run's keeps its zero init.
            np.testing.assert_array_equal(got.pop("mask_token"), 0.0)
        assert_same(got, expected)
    # Without init_from the same recipe starts elsewhere (the check above is not vacuous).
    fresh = weights(build_model(recipe.replace(init_from=""), 1, 16).student_backbone)
    assert not np.allclose(fresh["block_0/attn/qkv/kernel"], expected["block_0/attn/qkv/kernel"])


def test_learned_positions_of_another_grid_are_resampled(tmp_path):
    path = tmp_path / "big.keras"
    source = save_backbone(path, image_size=32)  # a 4x4 grid; the recipe's crops give 2x2
    target = init_backbone_from(kp.training.build_backbone(MICRO, 16), str(path))
    got, expected = weights(target), weights(source)
    np.testing.assert_allclose(
        got.pop("pos_embed"), keras.ops.convert_to_numpy(source.position_embedding((2, 2))), atol=1e-6
    )
    expected.pop("pos_embed")
    assert_same(got, expected)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(embed_dim=48), r"cls_token is \(1, 1, 48\) in the file and \(1, 1, 32\) in the recipe's backbone"),
        (dict(depth=2), r"the file has block_1/norm1/gamma \(32,\), the recipe's backbone has no such variable"),
    ],
)
def test_another_architecture_is_one_error(tmp_path, sizes, message):
    path = tmp_path / "other.keras"
    save_backbone(path, **sizes)
    with pytest.raises(ValueError, match=message) as error:
        build_model(MICRO.replace(init_from=str(path)), 1, 16)
    text = str(error.value)
    assert "\n" not in text and str(path) in text and "use the recipe whose backbone matches" in text


def test_learned_table_cannot_start_a_fixed_sincos_one(tmp_path):
    path = tmp_path / "dino.keras"
    save_backbone(path)
    target = kp.training.build_backbone(MICRO.replace(method="pqcl"), 16)
    assert target.pos_embed_kind == "sincos"
    with pytest.raises(
        ValueError,
        match="position table is learned.*pos_embed='learned'.*query_position_code='table'.*pos_embed='sincos'",
    ) as e:
        init_backbone_from(target, str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_torch_checkpoint_starts_the_backbone(tmp_path):
    torch = pytest.importorskip("torch")
    keras.utils.set_random_seed(5)
    source = kp.backbones.vit_tiny(8, image_size=16, **TINY)
    w = weights(source)
    # The official layouts: torch Linear (out, in), Conv2d (out, in, kh, kw).
    state = {
        "cls_token": w["cls_token"],
        "pos_embed": w["pos_embed"],
        "patch_embed.proj.weight": w["patch_embed/proj/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": w["patch_embed/proj/bias"],
        "norm.weight": w["norm/gamma"],
        "norm.bias": w["norm/beta"],
    }
    for torch_name, name in [("norm1", "norm1"), ("norm2", "norm2")]:
        state[f"blocks.0.{torch_name}.weight"] = w[f"block_0/{name}/gamma"]
        state[f"blocks.0.{torch_name}.bias"] = w[f"block_0/{name}/beta"]
    for torch_name, name in [
        ("attn.qkv", "attn/qkv"),
        ("attn.proj", "attn/proj"),
        ("mlp.fc1", "mlp/fc1"),
        ("mlp.fc2", "mlp/fc2"),
    ]:
        state[f"blocks.0.{torch_name}.weight"] = w[f"block_0/{name}/kernel"].T
        state[f"blocks.0.{torch_name}.bias"] = w[f"block_0/{name}/bias"]
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
    target = init_backbone_from(kp.training.build_backbone(MICRO, 16), str(path))
    assert_same(weights(target), w, atol=1e-7)


def test_cli_flag_reaches_the_recipe_and_resume_keeps_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "start.keras"
    expected = weights(save_backbone(path))
    recipe_file = tmp_path / "micro.py"
    fields = {k: v for k, v in json.loads(MICRO.replace(base_lr=0.0).to_json()).items() if k != "init_from"}
    recipe_file.write_text(RECIPE_FILE.format(recipe=fields))
    out = str(tmp_path / "run")
    args = ["pretrain", "--recipe", str(recipe_file), "--output", out, "--quiet"]

    assert cli.main(args + ["--init-from", str(path)]) == 0
    with open(os.path.join(out, "recipe.json")) as f:
        assert json.load(f)["init_from"] == str(path)
    for role in ("teacher", "student"):
        # The teacher is an EMA of an equal student: equal up to rounding.
        assert_same(weights(kp.load_backbone(os.path.join(out, f"{role}_backbone.keras"))), expected, atol=1e-6)

    # The run shaped by the file cannot switch to another one on resume...
    other = tmp_path / "other.keras"
    save_backbone(other, seed=4)
    capsys.readouterr()
    assert cli.main(args + ["--init-from", str(other), "--epochs", "2", "--resume"]) == 2
    assert "--resume cannot change init_from" in capsys.readouterr().err
    # ... and resuming it with the same file continues the checkpoint, not the file;
    # without the flag the run keeps its file.
    assert cli.main(args + ["--init-from", str(path), "--epochs", "2", "--resume"]) == 0
    assert "not loaded: the checkpoint" in capsys.readouterr().out
    assert cli.main(args + ["--epochs", "3", "--resume"]) == 0
    with open(os.path.join(out, "recipe.json")) as f:
        assert json.load(f)["init_from"] == str(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "not_keras"])
def test_unreadable_file_is_one_line_before_the_data(tmp_path, capsys, kind, monkeypatch):
    path = tmp_path / {"missing": "nope.keras", "directory": "run", "not_keras": "weights.keras"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "not_keras":
        path.write_text("not a zip")

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before init_from was checked")

    monkeypatch.setattr(kp.training, "build_dataset", no_data)
    out = tmp_path / "out"
    assert cli.main(["pretrain", "--recipe", "tiny", "--output", str(out), "--init-from", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("keras-pqcl: error:") and str(path) in err
    assert {"missing": "not found", "directory": "is a directory", "not_keras": "not a zip"}[kind] in err
