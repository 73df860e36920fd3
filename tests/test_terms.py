"""The loss-term composition: KoLeo against NumPy, a term added to a method, configs."""

import keras
import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl.models.terms import TERMS, KoLeo
from keras_pqcl.models.terms.koleo import koleo


def _numpy_koleo(x, eps=1e-8):
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nearest = x[dots.argmax(axis=1)]
    return -np.mean(np.log(np.linalg.norm(x - nearest + eps, axis=1) + eps))


def test_koleo_matches_numpy():
    x = np.random.default_rng(0).normal(size=(7, 5)).astype("float32")
    got = float(keras.ops.convert_to_numpy(koleo(x)))
    np.testing.assert_allclose(got, _numpy_koleo(x), rtol=1e-5)


def _tiny_vit(**kwargs):
    return kp.backbones.vit_tiny(8, depth=1, embed_dim=16, num_heads=2, image_size=16, **kwargs)


def _batch(batch=4):
    rng = np.random.default_rng(1)
    return {
        "global_crops": rng.uniform(size=(batch, 2, 16, 16, 3)).astype("float32"),
        "local_crops": rng.uniform(size=(batch, 2, 8, 8, 3)).astype("float32"),
    }


def test_a_registered_term_joins_a_method_by_name():
    """DINO + KoLeo: the total is cls + 0.1 * koleo, each logged, and the config keeps it."""
    model = kp.models.DINO(_tiny_vit(), out_dim=32, hidden_dim=16, bottleneck_dim=8, extra_terms=["koleo"])
    assert [t.log_name for t in model.terms] == ["cls", "koleo"] and "koleo" in model.loss_terms
    assert "koleo" not in model.collapse_terms  # not a cross-entropy over prototypes
    loss, logs = model.ssl_forward(_batch(), keras.ops.convert_to_tensor(0), training=False)
    total = float(logs["cls"]) + 0.1 * float(logs["koleo"])
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    features = keras.ops.convert_to_numpy(
        model.student_backbone(keras.ops.reshape(np.swapaxes(_batch()["global_crops"], 0, 1), (-1, 16, 16, 3)))["cls"]
    ).reshape(2, 4, -1)
    np.testing.assert_allclose(float(logs["koleo"]), sum(_numpy_koleo(f) for f in features), rtol=1e-4)

    clone = kp.models.DINO.from_config(model.get_config())
    assert [type(t) for t in clone.terms] == [type(t) for t in model.terms]
    assert clone.terms[1].weight == pytest.approx(0.1)


def test_the_generic_model_takes_terms_and_round_trips():
    terms = [TERMS["cls"](32, local_crops=False), KoLeo(weight=0.5)]
    model = kp.models.SelfDistillation(_tiny_vit(), terms=terms, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    config = model.get_config()
    clone = kp.models.SelfDistillation.from_config(config)
    assert [t.get_config() for t in clone.terms] == [t.get_config() for t in model.terms]
    assert clone.student_head.__class__.__name__ == "DINOHead"  # no term reads patch or query tokens


def test_unknown_terms_and_two_query_terms_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown loss term 'kolo'"):
        kp.models.DINO(_tiny_vit(), out_dim=32, hidden_dim=16, bottleneck_dim=8, extra_terms=["kolo"])
    backbone = _tiny_vit(use_mask_token=True, pos_embed="sincos")
    with pytest.raises(ValueError, match="Only one loss term may provide query tokens"):
        kp.models.PQCL(backbone, out_dim=32, hidden_dim=16, bottleneck_dim=8, extra_terms=["query_crops"])


def test_needs_follow_the_terms():
    assert kp.models.DINO.needs() == kp.models.Needs()
    assert kp.models.PQCL.needs(base="dino").masks is False
    assert kp.models.ADCLR.needs().mask_token is False  # query crops read pixels, not the mask token
    assert kp.models.ADCLR.needs(base="ibot").mask_token is True


def test_fit_sets_one_run_length_for_every_schedule():
    """The optimizer was built for 1 epoch; fit(epochs=3) is what counts, for the learning rate,
    the weight decay and the model's own momentum and temperatures alike."""
    model = kp.models.DINO(_tiny_vit(), out_dim=32, hidden_dim=16, bottleneck_dim=8)
    model.compile(optimizer=kp.optimizers.dino_adamw(4, 1, 1))
    model.fit(_batch(), batch_size=4, epochs=3, verbose=0)
    assert model.optimizer._learning_rate.total_steps == model.optimizer.decay.total_steps == 3
    assert float(keras.ops.convert_to_numpy(model.schedules.total_steps)) == 3.0
    values = model.schedules.values(keras.ops.convert_to_tensor(3))
    assert {"teacher_momentum", "learning_rate", "weight_decay", "teacher_temp"} <= set(values)
    np.testing.assert_allclose(float(values["teacher_momentum"]), 1.0, rtol=1e-6)


def test_global_query_crops_need_their_positions():
    term = kp.models.terms.QueryCrops(32, query_position="global")
    crops = np.zeros((2, 1, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="query_position='global' needs the queries' positions"):
        term.tokens(_tiny_vit(pos_embed="sincos"), crops, n_views=1)


def test_a_checkpoint_of_the_old_layout_says_so(tmp_path):
    """A 0.1 whole-model checkpoint of a self-distillation method (no layout 2 in its record)
    that Keras cannot load is named as such, with the backbone file to use instead."""
    import json
    import zipfile

    from keras_pqcl.io.load import load_backbone

    model = kp.models.DINO(_tiny_vit(), out_dim=32, hidden_dim=16, bottleneck_dim=8)
    saved = str(tmp_path / "model.keras")
    model.save(saved)
    old = str(tmp_path / "checkpoint-e00001-s0000000.keras")
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            if not name.endswith(".h5"):  # weights Keras cannot match
                dst.writestr(name, src.read(name))
        dst.writestr("keras_pqcl_progress.json", json.dumps({"epoch": 1, "step": 0, "steps_per_epoch": 1}))
    with pytest.raises(ValueError, match="written by keras_pqcl 0.1.*teacher_backbone.keras"):
        load_backbone(old, use="teacher")
