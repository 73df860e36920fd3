"""Every registered method runs end to end through the recipe runner; recipe derivation;
the collapse guard."""

import dataclasses
import math
import os

import keras
import numpy as np
import pytest

from keras_pqcl import models
from keras_pqcl.callbacks import CollapseGuard, load_checkpoint
from keras_pqcl.recipe import Recipe, load_recipe
from keras_pqcl.callbacks.epoch_log import read_log
from keras_pqcl.training import METHODS, build_backbone, pretrain

MICRO = Recipe(
    name="micro",
    method="dino",
    backbone="vit_tiny",
    patch_size=8,
    drop_path_rate=0.0,
    backbone_args=dict(embed_dim=32, depth=1, num_heads=2),
    method_args=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
    data="synthetic_scenes:16",
    crops=dict(global_size=16, local_size=8, n_local=1),
    batch_size=8,
    epochs=1,
    warmup_epochs=1,
    checkpoint_every=1,
)

# The log columns each method must write (per-term losses and monitors, issue 5 part 4).
TERMS = {
    "dino": {"loss", "cls", "teacher_entropy"},
    "ibot": {"loss", "cls", "mim", "teacher_entropy", "masked_fraction"},
    "pqcl": {"loss", "cls", "mim", "query", "query_agreement", "teacher_entropy"},
    "dino_pqcl": {"loss", "cls", "query", "query_agreement", "teacher_entropy"},
    "adclr": {"loss", "cls", "query", "query_agreement", "teacher_entropy"},
    "densecl": {"loss", "global", "dense"},
    "mcl": {"loss", "level_0", "level_1", "level_2", "level_3"},
}

# The convolutional methods (issue 7): a one-block-per-stage ResNet, their own crops.
RESNET_MICRO = {
    "densecl": dataclasses.replace(
        MICRO,
        name="micro_densecl",
        method="densecl",
        backbone="resnet_tiny",
        patch_size=32,
        backbone_args=dict(width=8),
        method_args=dict(hidden_dim=32, projection_dim=16, queue_size=64),
        crops=dict(
            global_size=32, local_size=32, n_local=0, jitter_p=0.0, global_blur_p=(0.5, 0.5), solarize_p=(0.0, 0.0)
        ),
        teacher_momentum=0.99,
    ),
    "mcl": dataclasses.replace(
        MICRO,
        name="micro_mcl",
        method="mcl",
        backbone="resnet_tiny",
        backbone_args=dict(width=8),
        method_args=dict(
            fpn_channels=16, neck_convs=1, neck_channels=16, hidden_dim=32, projection_dim=16, predictor_hidden_dim=32
        ),
        crops=dict(image_size=64, jitter_p=0.0),
        batch_size=4,
        teacher_momentum=0.99,
    ),
}


def test_every_method_is_registered_and_tested():
    assert set(METHODS) == set(TERMS)


@pytest.mark.parametrize("method", sorted(TERMS))
def test_method_pretrains_end_to_end(method, tmp_path):
    if method == "adclr" and not hasattr(models, "ADCLR"):
        pytest.skip("ADCLR is not in this build")
    recipe = RESNET_MICRO.get(method) or MICRO.derive(
        name=f"micro_{method}", method=method, masks=dict(ratio=0.3, ratio_var=0.0)
    )
    summary = pretrain(recipe, str(tmp_path), verbose=0)
    assert math.isfinite(summary["last_loss"])
    log = read_log(summary["log"])
    assert TERMS[method] <= set(log), sorted(log)
    if method in ("ibot", "pqcl"):
        assert log["masked_fraction"][0] > 0  # the dataset carried masks
    assert summary["transfer_backbone"] == summary["student_backbone" if method == "densecl" else "teacher_backbone"]
    backbone = keras.saving.load_model(summary["transfer_backbone"])
    if method in RESNET_MICRO:
        assert tuple(backbone(np.zeros((1, 64, 64, 3), "float32"))["C5"].shape)[:3] == (1, 2, 2)
    else:
        assert tuple(backbone(np.zeros((1, 16, 16, 3), "float32"))["cls"].shape) == (1, 32)


@pytest.mark.parametrize("method", ["dino", "pqcl"])
def test_use_bn_in_head_trains_and_reaches_every_head(method, tmp_path):
    """use_bn_in_head: student and teacher heads (iBOT-style token heads too) carry the
    batch-statistics BatchNorm, its gamma/beta are EMA-averaged, and the run's checkpoint
    reloads."""
    recipe = MICRO.derive(
        name=f"micro_bn_{method}",
        method=method,
        masks=dict(ratio=0.3, ratio_var=0.0),
        method_args=dict(use_bn_in_head=True),
    )
    summary = pretrain(recipe, str(tmp_path), verbose=0)
    assert math.isfinite(summary["last_loss"])
    model, epoch = load_checkpoint(os.path.join(str(tmp_path), "checkpoints"))
    assert epoch == 1
    assert model.use_bn_in_head and len(model.student_head.norms) == len(model.teacher_head.norms) == 2
    averaged = {id(t) for t, _ in model._teacher_pairs}
    assert all(id(v) in averaged for norm in model.teacher_head.norms for v in norm.weights)


def test_method_picks_its_backbone_and_recipe_can_override():
    pqcl = MICRO.derive(method="pqcl")
    backbone = build_backbone(pqcl, 16)
    assert backbone.pos_embed_kind == "sincos" and backbone.mask_token is not None
    assert build_backbone(MICRO, 16).pos_embed_kind == "learned"
    assert build_backbone(MICRO.derive(method="ibot"), 16).mask_token is not None
    # A recipe that insists on a learned table for PQCL gets the model's explanation.
    with pytest.raises(ValueError, match="pos_embed='sincos'"):
        METHODS["pqcl"].model(pqcl, build_backbone(pqcl.derive(pos_embed="learned"), 16))


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'nope'.*dino"):
        pretrain(MICRO.derive(method="nope"), str(tmp_path), verbose=0)


def test_derive_merges_dict_fields():
    tiny = load_recipe("tiny")
    derived = tiny.derive(method="ibot", crops=dict(n_local=2), method_args=dict(shared_head=False))
    assert derived.crops == {**tiny.crops, "n_local": 2}
    assert derived.method_args == {**tiny.method_args, "shared_head": False}
    assert derived.method == "ibot" and tiny.method == "dino"
    with pytest.raises(ValueError, match="Unknown recipe fields"):
        tiny.derive(nope=1)


@pytest.mark.parametrize("name", ["tiny_ibot", "tiny_pqcl", "tiny_dino_pqcl", "tiny_adclr"])
def test_tiny_variants_keep_the_tiny_setting(name):
    tiny, recipe = load_recipe("tiny"), load_recipe(name)
    assert recipe.method in METHODS and recipe.name == name
    assert (recipe.data, recipe.backbone_args, recipe.epochs) == (tiny.data, tiny.backbone_args, tiny.epochs)
    for key in ("warmup_teacher_patch_temp", "warmup_teacher_query_temp"):
        if key in recipe.method_args:
            assert recipe.method_args[key] == tiny.method_args["warmup_teacher_temp"]


# ---------------------------------------------------------------------- collapse guard
class _Model:
    # An iBOT/PQCL-like declaration: three cross-entropies over 100 prototypes.
    collapse_terms = {"cls": 100, "mim": 100, "query": 100}
    stop_training = False


def _run_guard(guard, epochs_of_logs):
    guard.set_model(_Model())
    for epoch, logs in enumerate(epochs_of_logs):
        guard.on_epoch_end(epoch, logs)
    return guard


def test_collapse_guard_uniform_after_patience():
    flat = {"loss": 2 * math.log(100), "cls": math.log(100), "mim": 0.999 * math.log(100), "teacher_entropy": 4.6}
    guard = _run_guard(CollapseGuard(patience=3, stop=True), [flat, flat])
    assert guard.message is None and not guard.model.stop_training
    guard.on_epoch_end(2, flat)
    assert "uniform" in guard.message and "ln K = 4.605" in guard.message
    assert guard.model.stop_training


def test_collapse_guard_one_prototype_and_warn_only():
    logs = {"loss": 1.0, "teacher_entropy": 0.01}
    guard = _run_guard(CollapseGuard(patience=2), [logs, logs])
    assert "one prototype" in guard.message and not guard.model.stop_training


def test_collapse_guard_quiet_on_healthy_or_interrupted_runs():
    ln_k = math.log(100)
    healthy = {"loss": 3.0, "cls": 3.0, "teacher_entropy": 4.0}
    flat = {"loss": ln_k, "cls": ln_k, "teacher_entropy": 4.6}
    # One term far below ln K is enough to rule out uniform collapse.
    partial = {"loss": ln_k + 1.0, "cls": ln_k, "query": 1.0, "teacher_entropy": 4.6}
    guard = _run_guard(CollapseGuard(patience=2), [healthy, flat, healthy, flat, partial, partial])
    assert guard.message is None


# ---------------------------------------------------------------------- k-NN monitor in the runner
def test_runner_logs_knn_every_n_epochs(tmp_path):
    recipe = MICRO.derive(name="micro_knn", epochs=5, steps_per_epoch=1, knn_every=2)
    summary = pretrain(recipe, str(tmp_path), verbose=0)
    knn = read_log(summary["log"])["knn_top1"]
    # Epochs 1 (the first), 2 and 4 (every 2nd) and 5 (the last) are evaluated; epoch 3 is NA.
    assert len(knn) == 5 and math.isnan(knn[2])
    assert all(0.0 <= knn[i] <= 100.0 for i in (0, 1, 3, 4))
    assert summary["knn_top1"] == knn[4]
    assert os.path.exists(summary["plot"])


def test_runner_knn_needs_labelled_held_out_data(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 0, 0)).save(folder / "a" / f"{i}.png")
    with pytest.raises(ValueError, match="knn_data to a folder with train/ and val/"):
        pretrain(MICRO.derive(data=str(folder), knn_every=1), str(tmp_path / "run"), verbose=0)
    (tmp_path / "knn" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="missing: .*val"):
        pretrain(MICRO.derive(knn_every=1, knn_data=str(tmp_path / "knn")), str(tmp_path / "run"), verbose=0)
