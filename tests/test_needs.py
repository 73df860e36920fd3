"""What each model declares (needs, transfer, collapse terms), that the runner builds from
those declarations alone, the collapse guard on declared terms, and the backbone contract."""

import inspect
import math

import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl import models
from keras_pqcl.backbones import check_backbone
from keras_pqcl.backbones.base import CONTRACT
from keras_pqcl.callbacks import CollapseGuard
from keras_pqcl.models.needs import Needs, constructor_arguments
from keras_pqcl.recipe import Recipe
from keras_pqcl.training import METHODS, build_backbone, dataset_args

from tests import helpers

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
)

VIT = dict(backbone="vit")
# The runner's behaviour before the models declared it (method name, extra method_args) ->
# what the method needs.
EXPECTED = {
    ("dino", ()): Needs(**VIT),
    ("ibot", ()): Needs(**VIT, mask_token=True, masks=True),
    ("pqcl", ()): Needs(**VIT, mask_token=True, pos_embed="sincos", masks=True, queries=True),
    ("dino_pqcl", ()): Needs(**VIT, mask_token=True, pos_embed="sincos", queries=True),
    # ADCLR: a mask token only for the iBOT base (its masked patches); the DINO base reads none.
    ("adclr", ()): Needs(**VIT),
    ("adclr", (("query_position", "global"),)): Needs(**VIT, pos_embed="sincos", queries=True),
    ("adclr", (("base", "ibot"),)): Needs(**VIT, mask_token=True, masks=True),
    ("densecl", ()): Needs(backbone="resnet", feature_maps=("C5",)),
    ("mcl", ()): Needs(backbone="resnet", feature_maps=("C2", "C3", "C4", "C5"), batches="montage"),
}


def _recipe(method, extra=()):
    return MICRO.derive(method=method, method_args=dict(extra))


def test_every_method_has_an_expected_answer():
    assert {method for method, _ in EXPECTED} == set(METHODS)


@pytest.mark.parametrize("method, extra", sorted(EXPECTED), ids=lambda v: str(v))
def test_needs_match_the_runner_table(method, extra):
    recipe = _recipe(method, extra)
    needs = METHODS[method].needs(recipe)
    assert needs == EXPECTED[method, extra]
    assert METHODS[method].model_class.transfer == ("student" if method == "densecl" else "teacher")
    if needs.backbone == "vit":
        backbone = build_backbone(recipe, 16)
        assert backbone.pos_embed_kind == (needs.pos_embed or "learned")
        assert backbone.has_mask_token == needs.mask_token
        args = dataset_args(recipe)
        assert ("masks" in args, "queries" in args) == (needs.masks, needs.queries)


def test_recipe_pos_embed_still_wins():
    assert build_backbone(MICRO.derive(pos_embed="sincos"), 16).pos_embed_kind == "sincos"


def test_needs_read_the_constructor_defaults():
    assert constructor_arguments(models.PQCL, {})["base"] == "ibot"
    assert constructor_arguments(models.ADCLR, {"target": "crop", "nope": 1})["base"] == "dino"
    assert constructor_arguments(models.ADCLR, {"target": "crop", "nope": 1})["target"] == "crop"
    assert constructor_arguments(models.ADCLR, {})["query_position"] == "crop"
    assert "nope" not in constructor_arguments(models.ADCLR, {"nope": 1})


def _set_default(monkeypatch, cls, name, value):
    """Change the default of ``cls.__init__``'s argument ``name``, as an edit of the model would."""
    init = cls.__dict__["__init__"]
    params = [
        p
        for p in inspect.signature(init).parameters.values()
        if p.default is not p.empty and p.kind == p.POSITIONAL_OR_KEYWORD
    ]
    defaults = list(init.__defaults__)
    defaults[[p.name for p in params].index(name)] = value
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))


def test_changing_a_model_default_changes_what_the_runner_builds(monkeypatch):
    pqcl, adclr = _recipe("pqcl"), _recipe("adclr")
    assert "masks" in dataset_args(pqcl)
    assert build_backbone(adclr, 16).pos_embed_kind == "learned" and "queries" not in dataset_args(adclr)

    _set_default(monkeypatch, models.PQCL, "base", "dino")
    assert "masks" not in dataset_args(pqcl)
    _set_default(monkeypatch, models.ADCLR, "query_position", "global")
    _set_default(monkeypatch, models.ADCLR, "base", "ibot")
    assert build_backbone(adclr, 16).pos_embed_kind == "sincos"
    assert set(dataset_args(adclr)) == {"masks", "queries"}


# ---------------------------------------------------------------------- declared collapse terms
def _vit(**kwargs):
    kwargs = {"pos_embed": "sincos", "use_mask_token": True, **kwargs}
    return kp.backbones.VisionTransformer(patch_size=8, embed_dim=16, depth=1, num_heads=2, image_size=16, **kwargs)


HEAD = dict(hidden_dim=16, bottleneck_dim=8, head_layers=2)


def test_models_declare_their_collapse_terms():
    with helpers.no_random_init():
        assert models.DINO(_vit(), out_dim=12, **HEAD).collapse_terms == {"cls": 12}
        ibot = models.IBOT(_vit(), out_dim=12, patch_out_dim=6, shared_head=False, **HEAD)
        assert ibot.collapse_terms == {"cls": 12, "mim": 6}
        assert models.PQCL(_vit(), out_dim=12, **HEAD).collapse_terms == {"cls": 12, "query": 12, "mim": 12}
        assert models.PQCL(_vit(), base="dino", out_dim=12, **HEAD).collapse_terms == {"cls": 12, "query": 12}
        assert models.ADCLR(_vit(), out_dim=12, **HEAD).collapse_terms == {"cls": 12, "query": 12}
    assert models.DenseCL.collapse_terms.fget(None) == {} and models.MCL.collapse_terms.fget(None) == {}


class _IBOTLike:
    collapse_terms = {"cls": 100, "mim": 10}
    stop_training = False


def test_collapse_guard_reads_each_declared_term_against_its_own_ln_k():
    guard = CollapseGuard(patience=2, stop=True)
    guard.set_model(_IBOTLike())
    flat = {"loss": math.log(100) + math.log(10), "cls": math.log(100), "mim": math.log(10), "teacher_entropy": 4.6}
    # "mim" far below ln 100 but at its own floor ln 10: collapsed.
    guard.on_epoch_end(0, flat)
    guard.on_epoch_end(1, flat)
    assert "uniform" in guard.message and "mim 2.303 at ln K = 2.303" in guard.message
    assert guard.model.stop_training
    # A term below its own floor rules it out.
    quiet = CollapseGuard(patience=1)
    quiet.set_model(_IBOTLike())
    quiet.on_epoch_end(0, {**flat, "mim": 1.0})
    assert quiet.message is None


def test_collapse_guard_says_it_has_nothing_to_watch_for_densecl(capsys):
    with helpers.no_random_init():
        model = models.DenseCL(
            kp.backbones.resnet("resnet_tiny", width=4), hidden_dim=8, projection_dim=4, queue_size=8
        )
    guard = CollapseGuard(patience=1)
    guard.set_model(model)
    guard.on_train_begin()
    guard.on_train_begin()  # a resumed run's second fit: said once
    guard.on_epoch_end(0, {"loss": 100.0, "global": 100.0, "dense": 100.0, "teacher_entropy": 0.0})
    out = capsys.readouterr().out
    assert out.count("nothing to watch for DenseCL") == 1
    assert guard.message is None


# ---------------------------------------------------------------------- backbone contract
def test_vit_and_resnet_declare_the_contract():
    vit = _vit(pos_embed="learned", use_mask_token=False)
    resnet = kp.backbones.resnet("resnet_tiny", width=4)
    assert (vit.pos_embed_kind, vit.has_mask_token, vit.embed_dim, vit.patch_size, dict(vit.out_channels)) == (
        "learned",
        False,
        16,
        8,
        {},
    )
    assert _vit().has_mask_token
    assert (resnet.pos_embed_kind, resnet.has_mask_token, resnet.embed_dim, resnet.patch_size) == (None, False, 128, 32)
    images = np.zeros((2, 64, 64, 3), "float32")
    for backbone in (_vit(), resnet):
        assert all(hasattr(backbone, name) for name in CONTRACT)
        out = backbone.forward_features(images)
        assert {"cls", "patches", "last_blocks"} <= set(out)
        assert tuple(out["cls"].shape) == (2, backbone.embed_dim)
        grid = 64 // backbone.patch_size
        spatial = tuple(out["patches"].shape[1:-1])
        assert spatial in ((grid * grid,), (grid, grid)) and out["patches"].shape[-1] == backbone.embed_dim
        assert tuple(out["last_blocks"][-1].shape) == (2, 1 + grid * grid, backbone.embed_dim)


def test_check_backbone_names_everything_missing_and_the_fix():
    pqcl = models.PQCL.needs()
    check_backbone(_vit(), pqcl, "PQCL")  # meets it
    with pytest.raises(
        ValueError,
        match=r"PQCL needs pos_embed='sincos' \(got 'learned'\) and a mask token;.*"
        r"pos_embed='sincos'.*use_mask_token=True",
    ):
        check_backbone(_vit(pos_embed="learned", use_mask_token=False), pqcl, "PQCL")
    resnet = kp.backbones.resnet("resnet_tiny", width=4)
    with pytest.raises(ValueError, match="DINO needs a Vision Transformer.*vit_small"):
        check_backbone(resnet, models.DINO.needs(), "DINO")
    with pytest.raises(ValueError, match="'C5'.*out_channels.*resnet50"):
        check_backbone(_vit(), models.DenseCL.needs(), "DenseCL")
    check_backbone(resnet, models.MCL.needs(), "MCL")
    with pytest.raises(ValueError, match="declares pos_embed_kind, has_mask_token, embed_dim, patch_size "):
        check_backbone(object(), models.DINO.needs(), "DINO")
    with pytest.raises(ValueError, match="DenseCL needs a backbone that declares out_channels"):
        check_backbone(object(), models.DenseCL.needs(), "DenseCL")


def test_model_constructors_check_their_backbone():
    with helpers.no_random_init():
        with pytest.raises(ValueError, match="DINO needs a Vision Transformer"):
            models.DINO(kp.backbones.resnet("resnet_tiny", width=4), out_dim=12, **HEAD)
        with pytest.raises(ValueError, match="ADCLR needs pos_embed='sincos'.*query_position='crop'"):
            models.ADCLR(_vit(pos_embed="learned"), query_position="global", out_dim=12, **HEAD)
        # "crop" positions come from the backbone's own table: a learned one is fine.
        models.ADCLR(_vit(pos_embed="learned"), out_dim=12, **HEAD)
        with pytest.raises(ValueError, match="MCL needs a backbone that returns a dict with 'C2'"):
            models.MCL(_vit())


def test_plot_log_draws_the_terms_it_is_given(tmp_path, monkeypatch):
    """The loss panel shows the model's loss_terms (DenseCL's here), not a list of names."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from keras_pqcl.plots import plot_log

    drawn, plot = [], Axes.plot

    def record(self, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    history = {"epoch": [0, 1], "loss": [2, 1], "global": [1, 0.5], "dense": [1, 0.4], "query_agreement": [0.1, 0.2]}
    plot_log(history, str(tmp_path / "loss.png"), terms=("global", "dense", "query_agreement", "absent"))
    # query_agreement has a panel of its own; absent terms are skipped.
    assert drawn == ["loss", "global", "dense", "query_agreement"]
