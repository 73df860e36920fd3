"""The continued pre-training recipes (``pqcl_continue_vit_small14`` and its tiny twin
``tiny_pqcl_continue``): views, schedules, and a PQCL run that starts from a saved backbone.

That ``init_from`` starts both networks of DINO and iBOT runs, resamples tables, reports
mismatches and reaches a whole run through ``--init-from`` is tested in ``test_init_from.py``;
here the PQCL side (mask token added, learned table read by the queries) through the twin's settings.
"""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pqcl as kp
from keras_pqcl.data import MultiCrop, MultiCropConfig, QueryConfig
from keras_pqcl.recipe import load_recipe
from keras_pqcl.training import build_model, build_optimizer
from tests.test_pqcl_recipe import OFFICIAL_VIEWS

# The views of the official PQCL pipeline, the local crop moved to the 14-pixel grid.
OFFICIAL_VIEWS_14 = {**OFFICIAL_VIEWS, "local_size": 98}


def lr_formula(step, peak, end, warmup, total):
    """DINO's schedule: ``linspace(0, peak, warmup)``, then cosine ``peak -> end``."""
    if step < warmup:
        return peak * step / max(warmup - 1, 1)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_full_size_recipe_views_and_grid():
    recipe = load_recipe("pqcl_continue_vit_small14")
    assert (recipe.method, recipe.backbone, recipe.patch_size) == ("pqcl", "vit_small14", 14)
    assert recipe.method_args["base"] == "ibot" and recipe.pos_embed == "learned"  # DINOv2's table
    assert recipe.method_args["query_position_code"] == "table"
    config = dataclasses.asdict(MultiCropConfig(**recipe.crops))
    for name, value in OFFICIAL_VIEWS_14.items():
        assert config[name] == pytest.approx(value), name
    MultiCropConfig(**recipe.crops).check_patch_size(14)
    # 224 / 14 = 16 patches a side; the 98 px crop gives 7 x 7 = 49 queries per global view.
    assert (recipe.crops["global_size"] // 14, recipe.crops["local_size"] // 14) == (16, 7)


def test_full_size_recipe_is_gentler_than_from_scratch():
    recipe, scratch = load_recipe("pqcl_continue_vit_small14"), load_recipe("pqcl_vit_small")
    assert recipe.base_lr == pytest.approx(scratch.base_lr / 10)
    assert recipe.warmup_epochs == 1 < scratch.warmup_epochs
    assert recipe.teacher_momentum > scratch.teacher_momentum
    assert recipe.method_args["warmup_teacher_temp_epochs"] < recipe.epochs
    assert recipe.init_from is None  # the starting weights are the user's: --init-from FILE


@pytest.mark.parametrize("name", ["pqcl_continue_vit_small14", "tiny_pqcl_continue"])
def test_learning_rate_schedule(name):
    recipe = load_recipe(name)
    steps = 7  # per epoch
    optimizer = build_optimizer(recipe, steps)

    def schedule(step):
        optimizer.iterations.assign(step)  # the learning rate the optimizer applies at that step
        return optimizer.learning_rate

    peak = recipe.base_lr * recipe.batch_size / 256
    warmup, total = recipe.warmup_epochs * steps, recipe.epochs * steps
    for step in [0, 1, warmup - 1, warmup, warmup + 3, total // 2, total - 1]:
        expected = lr_formula(step, peak, recipe.min_lr, warmup, total)
        got = float(keras.ops.convert_to_numpy(schedule(step)))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-10), step
    # The warm-up is over after one epoch, at a tenth of the from-scratch peak.
    assert float(keras.ops.convert_to_numpy(schedule(warmup - 1))) == pytest.approx(peak, rel=1e-6)


def test_tiny_twin_settings():
    recipe, tiny_pqcl = load_recipe("tiny_pqcl_continue"), load_recipe("tiny_pqcl")
    assert (recipe.method, recipe.patch_size, recipe.pos_embed) == ("pqcl", 14, "learned")
    assert recipe.method_args["query_position_code"] == "table"
    assert (recipe.crops["global_size"], recipe.crops["local_size"]) == (56, 28)
    # Same token grids as the tiny recipes' 32 / 16 px crops of 8 px patches: 4 x 4 and 2 x 2.
    assert recipe.crops["global_size"] // 14 == tiny_pqcl.crops["global_size"] // tiny_pqcl.patch_size == 4
    assert recipe.base_lr == pytest.approx(tiny_pqcl.base_lr / 10)
    assert recipe.teacher_momentum > tiny_pqcl.teacher_momentum
    assert recipe.warmup_epochs == 1 and recipe.epochs <= 5 and recipe.knn_every == 1


def test_tiny_twin_query_grid():
    """The twin's crops give 2 x 2 = 4 query positions per local crop and global view, each
    inside the 4 x 4 patch grid of that view."""
    recipe = load_recipe("tiny_pqcl_continue")
    crops = MultiCrop(MultiCropConfig(**recipe.crops, use_keras_cv=False), queries=QueryConfig(14))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    out = {k: v.numpy() for k, v in crops(image, -1, tf.constant([3, 0])).items()}
    assert out["global_crops"].shape == (2, 56, 56, 3) and out["local_crops"].shape == (2, 28, 28, 3)
    coords = out["query_coords"]
    assert coords.shape == (2, 2, 4, 2)
    assert np.all(coords > -1) and np.all(coords < 4)


MICRO = dict(
    backbone_args=dict(embed_dim=32, depth=1, num_heads=2),
    method_args=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
    data="synthetic_scenes:16",
    crops=dict(global_size=28, local_size=14),
    batch_size=8,
    epochs=1,
    steps_per_epoch=1,
    knn_every=0,
)


def micro_twin(**changes):
    """``tiny_pqcl_continue`` with a 1-block 32-wide ViT/14 on 28 / 14 px crops."""
    return load_recipe("tiny_pqcl_continue").derive(**MICRO).replace(**changes)


def save_start(path, recipe):
    """A DINO-style backbone (no mask token) of ``recipe``'s architecture, saved to ``path``."""
    keras.utils.set_random_seed(7)
    backbone = kp.backbones.vit(
        recipe.backbone,
        patch_size=recipe.patch_size,
        image_size=recipe.crops["global_size"],
        pos_embed="learned",
        **recipe.backbone_args,
    )
    backbone.save(str(path))
    return {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) for v in backbone.weights}


def backbone_weights(backbone):
    return {
        v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v)
        for v in backbone.weights
        if "seed_generator" not in v.path
    }


def assert_starts_from(backbone, expected):
    got = backbone_weights(backbone)
    # PQCL adds a mask token (the queries' base) that the DINO start lacks: it keeps its zero init.
    np.testing.assert_array_equal(got.pop("mask_token"), 0.0)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_pqcl_student_and_teacher_start_from_the_file(tmp_path):
    recipe = micro_twin()
    path = tmp_path / "start.keras"
    expected = save_start(path, recipe)
    model = build_model(recipe.replace(init_from=str(path)), 1, recipe.crops["global_size"])
    for backbone in (model.student_backbone, model.teacher_backbone):
        assert backbone.pos_embed_kind == "learned"
        assert_starts_from(backbone, expected)
    fresh = build_model(recipe, 1, recipe.crops["global_size"]).student_backbone
    assert not np.allclose(backbone_weights(fresh)["cls_token"], expected["cls_token"])
