"""ADCLR end to end on tiny ViTs (patch 8, 16-px globals, 8-px query crops).

One ``fit`` per backend distils a repeated pipeline batch with the defaults (DINO base,
cross-view targets, query positions from the crop's own grid, learned position table),
centers frozen and teacher temperatures constant, so every loss term must fall. Its
weights, and those of an untrained model with the other choice of every option (iBOT
base, the query crop's own teacher encoding as target, sin-cos positions in the global
views, teacher moved off the student), then feed:

* the query tokens against a NumPy patch embedding (conv kernel as a matmul over
  flattened patches) plus the interpolated position rows or the sin-cos code;
* the loss terms, the agreement monitor and the query center of ``ssl_forward`` for all
  four (target, position) combinations against NumPy, from networks run in image-major
  order (the step runs crop-major), with random centers so that centering counts;
* save/load and the error messages.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_pqcl as kp
from keras_pqcl.data import MaskConfig, MultiCropConfig, QueryConfig
from keras_pqcl.models.self_distillation import encode
from keras_pqcl.models.terms import StepOutputs

from tests import helpers

f64, softmax, log_softmax = helpers.f64, helpers.softmax, helpers.log_softmax

BATCH, GLOBAL, LOCAL, PATCH, N_LOCAL, DIM = 4, 16, 8, 8, 2, 32
HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
KEYS = ("global_crops", "local_crops", "global_masks", "query_coords")
DISTILL = dict(
    teacher_momentum=0.99,
    center_momentum=1.0,
    warmup_teacher_temp_epochs=0,
    freeze_last_layer=0,
    teacher_temp=0.04,
    teacher_patch_temp=0.04,
    teacher_query_temp=0.04,
)
EPOCHS, STEPS = 5, 2
# The fitted and the untrained configuration; the loss test reuses their weights for the
# two other (target, position) combinations.
DEFAULTS = dict(base="dino", target="cross_view", query_position="crop")
OTHERS = dict(base="ibot", target="crop", query_position="global")


def _np(x):
    return helpers.to_numpy(x)


def backbone(pos_embed="learned", use_mask_token=True):
    return kp.backbones.vit_tiny(
        PATCH,
        depth=1,
        embed_dim=DIM,
        num_heads=2,
        image_size=GLOBAL,
        pos_embed=pos_embed,
        use_mask_token=use_mask_token,
    )


def make(options, **kwargs):
    pos = "sincos" if options["query_position"] == "global" else "learned"
    return kp.models.ADCLR(backbone(pos), **options, **HEAD, **kwargs)


@pytest.fixture(scope="module")
def batch():
    """One batch of 4 from the real pipeline, as NumPy."""
    crops = MultiCropConfig(
        global_size=GLOBAL,
        local_size=LOCAL,
        n_local=N_LOCAL,
        flip_local=True,
        global_scale=(0.25, 1.0),
        local_scale=(0.05, 0.25),
    )
    ds = kp.data.pretrain_dataset(
        "synthetic_scenes:8",
        crops=crops,
        batch_size=BATCH,
        seed=0,
        photometric=False,
        masks=MaskConfig(patch_size=PATCH, ratio=0.3, ratio_var=0.0),
        queries=QueryConfig(patch_size=PATCH),
    )
    return {k: v.numpy() for k, v in next(iter(ds)).items() if k in KEYS}


def distill(model, batch):
    fixed = tf.data.Dataset.from_tensors(batch).repeat(STEPS)
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.0))
    return model.fit(fixed, epochs=EPOCHS, verbose=0).history


@pytest.fixture(scope="module")
def default_run(batch, tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = kp.models.ADCLR(backbone(), **HEAD, **DISTILL)
    history = distill(model, batch)
    path = str(tmp_path_factory.mktemp("adclr") / "adclr.keras")
    model.save(path)
    return model, history, path


@pytest.fixture(scope="module")
def global_model():
    """The other choice of every option, untrained (one more compiled step costs JAX half a
    minute; PQCL's tests fit the crop-target step): its teacher is moved off the student so
    that mixing the two up shows."""
    keras.utils.set_random_seed(1)
    model = make(OTHERS)
    rng = np.random.default_rng(1)
    for v in model.teacher_backbone.weights + model.teacher_head.weights:
        if "float" in str(v.dtype) and "pos_embed" not in v.path:
            v.assign(_np(v) + rng.normal(scale=0.05, size=v.shape).astype("float32"))
    return model


def query_inputs(model, data):
    """The student's query tokens ``(G B, T, D)`` of the batch ``data``, as the step builds them."""
    return model.term("query").query_tokens(model, StepOutputs(data, 0, 2, BATCH))[0]


def query_tokens(model, local_crops, n_views=1, backbone=None):
    """The query crops' tokens embedded by ``backbone`` (default the student's), ``n_views`` times."""
    return model.term("query").tokens(backbone or model.student_backbone, local_crops, n_views)


def _source(options, default_run, global_model):
    """The model whose weights suit ``options`` (the same kind of position table)."""
    return global_model if options["query_position"] == "global" else default_run[0]


# --------------------------------------------------------------- NumPy references
def np_query_tokens(vit, local_crops, position, coords=None):
    """Query tokens in float64, image-major: ``(B, T, D)``, or ``(B, G, T, D)`` with
    ``coords`` ``(B, G, n, L*L, 2)`` (``position="global"``)."""
    b, n, h, w, _ = local_crops.shape
    p, dim = vit.patch_size, vit.embed_dim
    kernel = f64(vit.patch_embed.proj.kernel).reshape(p * p * 3, dim)  # (row, col, channel) rows
    bias = f64(vit.patch_embed.proj.bias)
    tokens = helpers.patchify(local_crops.reshape(b * n, h, w, 3).astype(np.float64), p) @ kernel + bias
    if position == "crop":
        grid = (vit.grid_size, vit.grid_size)
        tokens = tokens + helpers.interpolate_pos(f64(vit.pos_embed)[0, 1:], grid, (h // p, w // p))
    tokens = tokens.reshape(b, n * (h // p) * (w // p), dim)
    if coords is None:
        return tokens
    codes = helpers.mae_sincos(coords[..., 0], coords[..., 1], dim).reshape(b, coords.shape[1], -1, dim)
    return tokens[:, None] + codes


def _ce(p, log_q):
    return -(p * log_q).sum(-1)


def _agreement(student_probs, teacher_probs):
    """Hit rate over images of argmax(mean_t student) == argmax(mean_t teacher)."""
    return np.mean(student_probs.mean(1).argmax(-1) == teacher_probs.mean(1).argmax(-1))


# --------------------------------------------------------------------- training
def _assert_learns(history, terms):
    for name in ("loss",) + terms:
        values = history[name]
        assert len(values) == EPOCHS and np.all(np.isfinite(values)), (name, values)
        assert values[-1] < values[0], (name, values)
    assert history["loss"][-1] < 0.75 * history["loss"][0], history["loss"]


def test_default_fit_lowers_loss(default_run):
    model, history, _ = default_run
    config = model.get_config()
    assert (config["base"], config["target"], config["query_position"]) == ("dino", "cross_view", "crop")
    assert config["local_cls_terms"] and config["lambda3"] == 1.0
    _assert_learns(history, ("cls", "query"))
    assert not {"mim", "masked_fraction", "teacher_patch_temp"} & set(history)
    for name in ("teacher_temp", "teacher_query_temp"):
        assert history[name] == pytest.approx([0.04] * EPOCHS)
    assert all(0.0 <= a <= 1.0 for a in history["query_agreement"])
    assert np.all(np.isfinite(history["teacher_entropy"]))


def test_no_parameters_beyond_the_dino_baseline(default_run):
    model = default_run[0]
    trainable = model.trainable_variables
    # Student backbone (mask token frozen: nothing reads it without masks) and head only.
    assert all(v.path.startswith(("vit_tiny", "student_head")) for v in trainable), [v.path for v in trainable]
    assert all(v is not model.student_backbone.mask_token for v in trainable)
    np.testing.assert_array_equal(_np(model.student_backbone.mask_token), 0.0)
    teacher_ids = {id(v) for v in model.teacher_backbone.weights + model.teacher_head.weights}
    assert not teacher_ids & {id(v) for v in trainable}
    with helpers.no_random_init():
        dino = kp.models.DINO(backbone(use_mask_token=False), **HEAD)
    count = lambda variables: sum(int(np.prod(v.shape)) for v in variables)  # noqa: E731
    assert count(trainable) == count(dino.trainable_variables)


# ------------------------------------------------------------------ query tokens
def test_crop_query_tokens_match_numpy(default_run, batch):
    """Patch embedding of the crop's pixels plus the backbone's table interpolated to the
    crop's grid: 8-px crops (one patch, 2x2 -> 1x1) and 24-px crops (3x3, row-major)."""
    model = default_run[0]
    rng = np.random.default_rng(0)
    for crops in (batch["local_crops"], rng.normal(size=(2, N_LOCAL, 24, 24, 3)).astype("float32")):
        for vit in (model.student_backbone, model.teacher_backbone):
            got = _np(query_tokens(model, crops, n_views=2, backbone=vit))
            expected = np_query_tokens(vit, crops, "crop")
            assert got.shape == (2 * len(crops),) + expected.shape[1:]
            # View-major: row v * B + b holds image b's queries for view v.
            np.testing.assert_allclose(got, np.concatenate([expected, expected]), rtol=1e-5, atol=1e-5)
    # The student's and the teacher's weights differ after training: each embeds with its own.
    s = _np(query_tokens(model, batch["local_crops"]))
    t = _np(query_tokens(model, batch["local_crops"], backbone=model.teacher_backbone))
    assert np.abs(s - t).max() > 1e-5


def test_global_query_tokens_match_numpy(global_model, batch):
    """Patch embedding plus the sin-cos code of the patch's place in each global view (no
    mask token, no crop-grid table)."""
    model = global_model
    data = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
    got = _np(query_inputs(model, data))
    expected = np_query_tokens(model.student_backbone, batch["local_crops"], "global", batch["query_coords"])
    assert got.shape == (2 * BATCH, N_LOCAL, DIM)
    np.testing.assert_allclose(got, np.swapaxes(expected, 0, 1).reshape(got.shape), rtol=1e-5, atol=2e-5)


def test_queries_leave_image_tokens_unchanged(default_run, global_model, batch):
    data = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
    images = kp.models.crop_major(data["global_crops"])
    masks = np.swapaxes(batch["global_masks"], 0, 1).reshape(2 * BATCH, -1)
    model = default_run[0]
    cases = [  # (backbone, masks, query tokens): both of the fitted model, and a masked student
        (model.student_backbone, None, query_inputs(model, data)),
        (model.teacher_backbone, None, query_tokens(model, data["local_crops"], 2, backbone=model.teacher_backbone)),
        (global_model.student_backbone, masks, query_inputs(global_model, data)),
    ]
    for vit, vit_masks, queries in cases:
        plain = vit(images, masks=vit_masks)
        with_queries = vit(images, masks=vit_masks, queries=queries)
        for key in ("cls", "patches"):
            np.testing.assert_allclose(_np(with_queries[key]), _np(plain[key]), rtol=0, atol=1e-6)
        # The queries do read the image tokens.
        other = vit(ops.flip(images, axis=0), masks=vit_masks, queries=queries)
        assert np.abs(_np(other["queries"]) - _np(with_queries["queries"])).max() > 1e-4


# ------------------------------------------- the loss against a per-view recomputation
COMBOS = [
    DEFAULTS,
    OTHERS,
    dict(base="ibot", target="cross_view", query_position="global"),
    dict(base="dino", target="crop", query_position="crop"),
]


@pytest.mark.parametrize("options", COMBOS, ids=lambda o: "-".join(o.values()))
def test_loss_terms_match_numpy(options, default_run, global_model, batch):
    """``ssl_forward`` against NumPy: L_cls (DINO multi-crop with the query crops'
    CLS), L_mim (ibot), L_query across views (query i of view a is the target of query i
    of view b != a) or against the crop's own teacher encoding; the agreement monitor;
    the query center's update."""
    source = _source(options, default_run, global_model)
    model = make(options)  # center momentum 0.9, temperatures 0.04 at epoch 0
    model.set_weights(source.get_weights())
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=1e-3))  # the logs read the optimizer
    tau_s, tau, m, k = 0.1, 0.04, 0.9, HEAD["out_dim"]
    ibot, cross_view = options["base"] == "ibot", options["target"] == "cross_view"
    rng = np.random.default_rng(3)
    centers = {}
    for name, shape in (("cls", (1, k)), ("mim", (1, 1, k)), ("query", (1, 1, k))):
        value = rng.normal(size=shape).astype("float32")  # drawn for the DINO base too: same centers
        if name != "mim" or ibot:
            model.term(name).center.assign(value)
            centers[name] = f64(model.term(name).center)
    c, c2, c3 = centers["cls"], centers.get("mim"), centers["query"]

    # Image-major rows: b * 2 + g is view g of image b; b * n + i is query crop i of image b.
    images = batch["global_crops"].reshape(2 * BATCH, GLOBAL, GLOBAL, 3)
    masks = batch["global_masks"].reshape(2 * BATCH, -1) if ibot else None
    locals_ = batch["local_crops"].reshape(N_LOCAL * BATCH, LOCAL, LOCAL, 3)
    coords = batch["query_coords"] if options["query_position"] == "global" else None

    def tokens(vit):  # (2B, T, D) float32, image-major
        t = np_query_tokens(vit, batch["local_crops"], options["query_position"], coords)
        t = t if coords is not None else np.repeat(t[:, None], 2, axis=1)
        return t.reshape(2 * BATCH, -1, DIM).astype("float32")

    def per_image(out):  # (2B, ...) -> (B, 2, ...)
        return {name: f64(v).reshape((BATCH, 2) + tuple(v.shape[1:])) for name, v in out.items()}

    student = per_image(
        encode(model.student_backbone, model.student_head, images, masks=masks, queries=tokens(model.student_backbone))
    )
    teacher_queries = tokens(model.teacher_backbone) if cross_view else None
    teacher = per_image(encode(model.teacher_backbone, model.teacher_head, images, queries=teacher_queries))

    local_cls = f64(model.student_head.token_logits(model.student_backbone(locals_)["cls"]))
    s_cls = [student["cls"][:, g] for g in range(2)] + list(np.moveaxis(local_cls.reshape(BATCH, N_LOCAL, k), 1, 0))
    p_cls = [softmax((teacher["cls"][:, g] - c) / tau) for g in range(2)]
    log_q = [log_softmax(s / tau_s) for s in s_cls]
    expected = {"cls": np.mean([_ce(p_cls[q], log_q[v]).mean() for q in range(2) for v in range(len(s_cls)) if v != q])}

    s_query = [log_softmax(student["queries"][:, g] / tau_s) for g in range(2)]
    if cross_view:
        raw_targets = teacher["queries"]  # (B, 2, T, K): per view
        p_query = [softmax((raw_targets[:, a] - c3) / tau) for a in range(2)]
        pairs = [(a, b) for a in range(2) for b in range(2) if a != b]
    else:
        local_patches = model.teacher_backbone(locals_)["patches"]
        raw_targets = f64(model.teacher_head.token_logits(local_patches)).reshape(BATCH, -1, k)
        p_query = [softmax((raw_targets - c3) / tau)]
        pairs = [(0, b) for b in range(2)]
    expected["query"] = np.mean([_ce(p_query[a], s_query[b]).mean() for a, b in pairs])
    agreement = np.mean([_agreement(np.exp(s_query[b]), p_query[a]) for a, b in pairs])
    if ibot:
        per_view = []
        for g in range(2):
            p_patch = softmax((teacher["patches"][:, g] - c2) / tau)
            ce = _ce(p_patch, log_softmax(student["patches"][:, g] / tau_s))
            mask = batch["global_masks"].reshape(BATCH, 2, -1)[:, g].astype(np.float64)
            per_view.append(((ce * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean())
        expected["mim"] = np.mean(per_view)

    loss, logs = model.ssl_forward(batch, 0, training=False)
    for name, value in expected.items():
        assert float(_np(logs[name])) == pytest.approx(value, rel=1e-4), name
    assert float(_np(loss)) == pytest.approx(sum(expected.values()), rel=1e-4)
    assert float(_np(logs["query_agreement"])) == pytest.approx(agreement)
    assert ("mim" in logs) == ibot
    # One update per step, from every raw teacher query output (or local patch).
    mean = raw_targets.reshape(-1, k).mean(0)
    center = _np(model.term("query").center)
    np.testing.assert_allclose(center[0, 0], m * c3[0, 0] + (1 - m) * mean, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ save/load
def _outputs(model, data):
    images = kp.models.crop_major(ops.convert_to_tensor(data["global_crops"]))
    local = ops.convert_to_tensor(data["local_crops"])
    student = encode(model.student_backbone, model.student_head, images, queries=query_tokens(model, local, 2))
    teacher = encode(
        model.teacher_backbone,
        model.teacher_head,
        images,
        queries=query_tokens(model, local, 2, backbone=model.teacher_backbone),
    )
    out = dict(
        call=model(images),
        student_cls=student["cls"],
        student_queries=student["queries"],
        teacher_cls=teacher["cls"],
        teacher_queries=teacher["queries"],
        center=model.term("cls").center,
        query_center=model.term("query").center,
    )
    return {k: _np(v) for k, v in out.items()}


def test_save_load(default_run, batch):
    model, _, path = default_run
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kp.models.ADCLR)
    config = loaded.get_config()
    for key, value in {**DEFAULTS, "out_dim": 64, "local_cls_terms": True, "lambda3": 1.0}.items():
        assert config[key] == value, key
    assert not loaded.student_backbone.mask_token.trainable
    assert int(_np(loaded.optimizer.iterations)) == EPOCHS * STEPS
    expected = _outputs(model, batch)
    assert np.abs(expected["student_queries"] - expected["teacher_queries"]).max() > 1e-5
    for name, value in _outputs(loaded, batch).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_config_round_trip(global_model):
    model = global_model
    clone = kp.models.ADCLR.from_config(model.get_config())
    config = clone.get_config()
    assert (config["base"], config["target"], config["query_position"], clone.out_dim) == ("ibot", "crop", "global", 64)
    assert "mim" in clone.trackers and clone.student_backbone.mask_token.trainable
    assert clone.get_config() == model.get_config()


def test_out_dim_follows_the_base():
    with helpers.no_random_init():
        small = dict(hidden_dim=8, bottleneck_dim=8)
        assert kp.models.ADCLR(backbone(), **small).out_dim == 65536
        assert kp.models.ADCLR(backbone(), base="ibot", **small).out_dim == 8192


# ------------------------------------------------------------------- errors
def test_option_and_backbone_errors():
    with helpers.no_random_init():
        for name, value in (("base", "mae"), ("query_position", "image"), ("target", "self")):
            with pytest.raises(ValueError, match=f"{name} must be one of"):
                kp.models.ADCLR(backbone(), **{name: value}, **HEAD)
        with pytest.raises(ValueError, match="pos_embed='sincos'.*query_position='crop'"):
            kp.models.ADCLR(backbone("learned"), query_position="global", **HEAD)
        with pytest.raises(ValueError, match="use_mask_token=True"):
            kp.models.ADCLR(backbone(use_mask_token=False), base="ibot", **HEAD)
        # The DINO base reads no mask token: a backbone without one is fine.
        assert not kp.models.ADCLR(backbone(use_mask_token=False), **HEAD).student_backbone.has_mask_token
        # Learned tables are fine with the crop's own positions.
        assert kp.models.ADCLR(backbone("learned"), **HEAD).get_config()["query_position"] == "crop"


def test_batch_errors(default_run, global_model, batch):
    model = default_run[0]
    without = lambda key: {k: v for k, v in batch.items() if k != key}  # noqa: E731
    with pytest.raises(ValueError, match="local_crops.*MultiCropConfig"):
        model.ssl_forward(without("local_crops"), 0)
    no_crops = dict(batch, local_crops=np.zeros((BATCH, 0, LOCAL, LOCAL, 3), "float32"))
    with pytest.raises(ValueError, match="at least one local crop"):
        model.ssl_forward(no_crops, 0)
    odd = dict(batch, local_crops=np.zeros((BATCH, N_LOCAL, 12, 12, 3), "float32"))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8.*local_size"):
        model.ssl_forward(odd, 0)
    with pytest.raises(ValueError, match="at least 2.*target='crop'"):
        model.ssl_forward(dict(batch, global_crops=batch["global_crops"][:, :1]), 0)
    # query_position="global" needs coordinates made for this patch size.
    with pytest.raises(ValueError, match="query_coords.*QueryConfig.*position='crop'"):
        global_model.ssl_forward(without("query_coords"), 0)
    bad = dict(batch, query_coords=np.zeros((BATCH, 2, N_LOCAL, 4, 2), "float32"))
    with pytest.raises(ValueError, match="QueryConfig\\(patch_size=8\\)"):
        global_model.ssl_forward(bad, 0)
    # The default model needs no coordinates at all.
    queries = query_inputs(model, without("query_coords"))
    assert tuple(queries.shape) == (2 * BATCH, N_LOCAL, DIM)
