"""One contract, run over every registered pre-training method (``keras_pqcl.training.METHODS``).

The cases come from the registry, so a newly registered method is tested here with no edit.
Each method runs from its ``tiny*`` recipe (the first in ``recipes/`` whose ``method`` it is,
else ``tiny`` with the method switched), shrunk to one step of a few images by
:func:`shrink`. Only the runner's public API is used: ``build_dataset``, ``build_model``,
``fit``, ``student_backbone``/``teacher_backbone``, ``get_config``/``from_config`` and
``keras.saving``. For every method:

* it builds, and one ``fit`` step gives a finite loss;
* its teacher is frozen: no teacher variable is trainable or has optimizer state, and one
  step with a constant momentum ``m`` moves each teacher parameter to
  ``m * teacher_before + (1 - m) * student_after`` and nowhere else (the exponential moving
  average of BYOL/MoCo/DINO);
* ``get_config`` -> ``from_config`` gives the same config and the same variable shapes;
* a ``.keras`` file restores every model and optimizer variable exactly;
* a ``mixed_bfloat16`` step gives a finite loss and keeps every variable in float32;
* the ViT methods also take one step on a DINOv2-style backbone.
"""

import math

import keras
import numpy as np
import pytest

from keras_pqcl import backbones, training
from keras_pqcl.recipe import available_recipes, load_recipe
from tests.helpers import IGNORE_NUMPY2_COPY_WARNING, to_numpy

# MCL's shrunk recipe leaves out two montage levels, whose predictors then get no gradient.
pytestmark = [IGNORE_NUMPY2_COPY_WARNING, pytest.mark.filterwarnings("ignore:Gradients do not exist")]

METHOD_NAMES = sorted(training.METHODS)

#: Teacher EMA momentum of the step, from start to end: a constant, so the expected teacher
#: does not depend on the step at which the momentum schedule is evaluated.
MOMENTUM = 0.8

#: Width and count arguments of the methods, capped at these values where a tiny recipe
#: sets them (a new method's other arguments keep their tiny values).
SMALL_METHOD_ARGS = dict(
    out_dim=32,
    patch_out_dim=32,
    hidden_dim=32,
    bottleneck_dim=16,
    projection_dim=16,
    predictor_hidden_dim=32,
    fpn_channels=16,
    neck_channels=16,
    neck_convs=1,
    queue_size=64,
)

BATCH = 8


def tiny_recipe(method):
    """The first ``tiny*`` recipe of ``method``; ``tiny`` with ``method`` switched if none."""
    for name in available_recipes():
        if name.startswith("tiny"):
            recipe = load_recipe(name)
            if recipe.method == method:
                return recipe
    return load_recipe("tiny").replace(method=method)


def shrink(recipe):
    """``recipe`` cut to one step of ``BATCH`` small images with a constant teacher momentum.

    ViTs: 1 block of width 32, 2-patch global and 1-patch local crops (at most one local crop).
    ResNets: width 8, global crops of one output stride (C5 is 1 x 1); MCL: 32 px views and
    only the 2 x 2 montages (the 4 x 4 and 8 x 8 levels would add to the step JAX and
    TensorFlow compile; their predictors then get no gradient and stay in place).
    No warm-up and a large learning rate, so that one step moves the student far enough for
    the EMA check to see it.
    """
    method_args = dict(recipe.method_args)
    for key, cap in SMALL_METHOD_ARGS.items():
        value = method_args.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            method_args[key] = min(value, cap)
    method_args["teacher_momentum_end"] = MOMENTUM
    crops = dict(recipe.crops)
    if recipe.backbone in backbones.RESNET_PRESETS:
        backbone_args = {**recipe.backbone_args, "width": 8}
        if "global_size" in crops:
            crops.update(global_size=recipe.patch_size, local_size=recipe.patch_size)
    else:
        backbone_args = {**recipe.backbone_args, "embed_dim": 32, "depth": 1, "num_heads": 2}
        if "global_size" in crops:
            crops.update(global_size=2 * recipe.patch_size, local_size=recipe.patch_size)
    if "global_size" in crops:
        crops["n_local"] = min(crops.get("n_local", 0), 1)
    if "image_size" in crops:  # MCL's montage views: one montage level (2 x 2) of the three
        crops.update(image_size=32, ratios=(2,))
    size = max(crops.get("global_size", 0), crops.get("image_size", 0))
    return recipe.replace(
        name=f"contract_{recipe.method}",
        backbone_args=backbone_args,
        method_args=method_args,
        crops=crops,
        data=f"synthetic_scenes:{BATCH}:{size}",
        batch_size=BATCH,
        epochs=1,
        steps_per_epoch=1,
        warmup_epochs=0,
        base_lr=0.3,
        teacher_momentum=MOMENTUM,
        knn_every=0,
        precision="float32",
    )


def _relative_path(variable):
    # "vit_tiny/block_0/attn/qkv/kernel" -> "block_0/attn/qkv/kernel": the student and the
    # teacher are the same network under another top-level name.
    return variable.path.split("/", 1)[1]


def _by_path(network):
    return {_relative_path(v): v for v in network.weights if "seed_generator" not in v.path}


def _is_float(variable):
    # By name: NumPy has no bfloat16 dtype of its own.
    return "float" in keras.backend.standardize_dtype(variable.dtype)


def _finite_loss(history):
    loss = history.history["loss"][-1]
    assert math.isfinite(loss), history.history
    return loss


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=METHOD_NAMES)
def case(request):
    """``(recipe, dataset, image_size, steps_per_epoch)`` of one method's shrunk recipe."""
    recipe = shrink(tiny_recipe(request.param))
    assert recipe.method == request.param
    dataset, _, image_size, steps = training.build_dataset(recipe)
    assert steps == 1
    return recipe, dataset, image_size, steps


@pytest.fixture(scope="module")
def trained(case):
    """One method's model before (as NumPy snapshots) and after one ``fit`` step."""
    recipe, dataset, image_size, steps = case
    keras.utils.set_random_seed(0)
    model = training.build_model(recipe, steps, image_size)
    before = {
        role: {key: to_numpy(v) for key, v in _by_path(getattr(model, f"{role}_backbone")).items()}
        for role in ("student", "teacher")
    }
    history = model.fit(dataset, epochs=1, verbose=0)
    return dict(recipe=recipe, model=model, history=history, before=before)


# --------------------------------------------------------------------------------- tests
def test_one_step_gives_a_finite_loss(trained):
    _finite_loss(trained["history"])
    model = trained["model"]
    bad = [v.path for v in model.weights if _is_float(v) and not np.isfinite(to_numpy(v)).all()]
    assert not bad, f"non-finite variables after one step: {bad}"


def test_teacher_is_frozen_and_moves_only_by_the_ema(trained):
    model, before = trained["model"], trained["before"]
    student, teacher = _by_path(model.student_backbone), _by_path(model.teacher_backbone)
    assert sorted(student) == sorted(teacher)

    # Frozen: not trainable, not handed to the optimizer, no optimizer state.
    assert [v.path for v in teacher.values() if v.trainable] == []
    trained_ids = {id(v) for v in model.trainable_variables}
    assert [v.path for v in teacher.values() if id(v) in trained_ids] == []

    # Keras names an optimizer slot (momentum, velocity...) after its variable's path, "/"
    # -> "_". The student's slots are found that way, so finding none of the teacher's means
    # it has none.
    def slots_of(variables):
        prefixes = tuple(v.path.replace("/", "_") + "_" for v in variables)
        return [v.name for v in model.optimizer.variables if v.name.startswith(prefixes)]

    assert slots_of(s for s in student.values() if s.trainable)
    assert slots_of(teacher.values()) == []

    # The parameters (the student's trainable variables) follow the EMA. BatchNorm moving
    # statistics of the ResNet methods are not averaged (each network keeps those of its own
    # batches), so non-trainable student variables are left out.
    m = MOMENTUM
    checked, moved = 0, 0.0
    for key, s in student.items():
        if not s.trainable:
            continue
        s_new, t_old, t_new = to_numpy(s), before["teacher"][key], to_numpy(teacher[key])
        expected = m * t_old.astype(np.float64) + (1.0 - m) * s_new.astype(np.float64)
        np.testing.assert_allclose(t_new, expected, rtol=1e-5, atol=1e-6, err_msg=key)
        checked += 1
        moved = max(moved, float(np.abs(s_new - before["student"][key]).max()))
    assert checked > 0
    # A step that left the student in place would make the check above vacuous.
    assert moved > 1e-3, moved


def test_config_round_trip(trained):
    model = trained["model"]
    config = model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    assert [tuple(v.shape) for v in clone.weights] == [tuple(v.shape) for v in model.weights]
    assert [_relative_path(v) for v in clone.student_backbone.weights] == [
        _relative_path(v) for v in model.student_backbone.weights
    ]


def test_keras_file_round_trip(trained, tmp_path):
    model = trained["model"]
    path = str(tmp_path / f"{trained['recipe'].method}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    assert len(loaded.weights) == len(model.weights)
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved), err_msg=saved.path)
    assert loaded.optimizer is not None
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved), err_msg=saved.path)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_mixed_bfloat16_step(case, mixed_bfloat16):
    recipe, dataset, image_size, steps = case
    model = training.build_model(recipe.replace(precision="mixed_bfloat16"), steps, image_size)
    assert model.student_backbone.compute_dtype == "bfloat16"
    _finite_loss(model.fit(dataset, epochs=1, verbose=0))
    # Parameters, teacher and centers stay in float32 (only the compute runs in bfloat16).
    wrong = [f"{v.path}: {v.dtype}" for v in model.weights if _is_float(v) and v.dtype != "float32"]
    assert not wrong, wrong


VIT_METHODS = [name for name in METHOD_NAMES if tiny_recipe(name).backbone not in backbones.RESNET_PRESETS]


@pytest.mark.parametrize("method", VIT_METHODS)
def test_one_step_on_a_dinov2_style_backbone(method):
    """Every ViT method trains on DINOv2's architecture: LayerScale, register tokens and a
    learned position table (what ``--init-from`` of DINOv2 weights gives). A method whose
    default needs the sin-cos table (PQCL's queries) reads the learned one with
    ``query_position_code="table"``."""
    recipe = shrink(tiny_recipe(method))
    method_args = dict(recipe.method_args)
    if training.METHODS[method].needs(recipe).pos_embed == "sincos":
        method_args["query_position_code"] = "table"
    recipe = recipe.replace(
        pos_embed="learned",
        method_args=method_args,
        backbone_args={**recipe.backbone_args, "layer_scale_init": 1e-5, "num_register_tokens": 1},
    )
    dataset, _, image_size, steps = training.build_dataset(recipe)
    keras.utils.set_random_seed(0)
    model = training.build_model(recipe, steps, image_size)
    _finite_loss(model.fit(dataset, epochs=1, verbose=0))
    for network in (model.student_backbone, model.teacher_backbone):
        assert network.num_register_tokens == 1 and network.pos_embed_kind == "learned"
