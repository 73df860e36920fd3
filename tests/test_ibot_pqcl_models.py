"""iBOT and PQCL models end to end on tiny ViTs (patch 8, 32-px globals, 16-px locals).

One transformer block: it has the query stream and the one-directional attention of any
depth; more blocks only lengthen JAX's compile of each train step.

A batch comes from ``pretrain_dataset`` (synthetic scenes, block masks, query coordinates)
and is repeated: three ``fit`` runs per backend (IBOT, PQCL on iBOT, PQCL on DINO) distil it
with (nearly) frozen centers and constant teacher temperatures, so every loss term must
fall. The PQCL(ibot) run also starts MIM at epoch 1 and has its three centers recomputed
after its first steps as momentum-0.9 averages of the teacher's CLS, patch and query
logits. ``ssl_forward`` itself is checked against a NumPy recomputation of every loss term
for both PQCL bases.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_pqcl as kp
from keras_pqcl.data import MaskConfig, MultiCropConfig, QueryConfig
from keras_pqcl.layers.pos_embed import sample_table, sincos_embedding, sincos_from_coords, sincos_grid
from keras_pqcl.models.self_distillation import encode
from keras_pqcl.models.terms import StepOutputs

BATCH, GLOBAL, LOCAL, PATCH, N_LOCAL = 4, 32, 16, 8, 2
HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
KEYS = ("global_crops", "local_crops", "global_masks", "query_coords")
# Distillation runs: centers frozen and teacher temperatures constant, so the targets
# barely move and the cross-entropies must fall (see tests/test_training.py).
DISTILL = dict(
    teacher_momentum=0.99,
    center_momentum=1.0,
    warmup_teacher_temp_epochs=0,
    freeze_last_layer=0,
    teacher_temp=0.04,
    teacher_patch_temp=0.04,
)
EPOCHS, STEPS = 5, 2
CENTER_MOMENTUM = 0.99


def _np(x):
    return np.array(ops.convert_to_numpy(x))


def backbone(pos_embed="sincos", use_mask_token=True):
    return kp.backbones.vit_tiny(
        PATCH,
        depth=1,
        embed_dim=32,
        num_heads=2,
        image_size=GLOBAL,
        pos_embed=pos_embed,
        use_mask_token=use_mask_token,
    )


@pytest.fixture(scope="module")
def batch():
    """One batch of 4 from the real pipeline, as NumPy: ``{key: (4, ...)}``."""
    crops = MultiCropConfig(
        global_size=GLOBAL,
        local_size=LOCAL,
        n_local=N_LOCAL,
        flip_local=False,
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
    data = {k: v.numpy() for k, v in next(iter(ds)).items() if k in KEYS}
    assert data["global_masks"].any(axis=(2, 3)).all()  # every crop masked (ratio 0.3)
    return data


def distill(model, batch, callbacks=()):
    fixed = tf.data.Dataset.from_tensors(batch).repeat(STEPS)
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.0))
    return model.fit(fixed, epochs=EPOCHS, verbose=0, callbacks=list(callbacks)).history


@pytest.fixture(scope="module")
def ibot_run(batch):
    keras.utils.set_random_seed(0)
    model = kp.models.IBOT(backbone("learned"), **HEAD, **DISTILL)
    return model, distill(model, batch)


@pytest.fixture(scope="module")
def pqcl_run(batch, tmp_path_factory):
    """PQCL(ibot): centers move slowly (momentum 0.99, so that the targets stay nearly put
    but every update is visible) and MIM starts at epoch 1."""
    keras.utils.set_random_seed(1)
    model = kp.models.PQCL(
        backbone(),
        **HEAD,
        **{**DISTILL, "center_momentum": CENTER_MOMENTUM},
        teacher_query_temp=0.04,
        pred_start_epoch=1,
    )
    # Steps 0-2: the first update, one within epoch 0, and the first with MIM on.
    recorder = CenterRecorder(batch, checked_steps=3)
    history = distill(model, batch, [recorder])
    path = str(tmp_path_factory.mktemp("pqcl") / "pqcl.keras")
    model.save(path)
    return model, history, recorder, path


@pytest.fixture(scope="module")
def pqcl_dino_run(batch):
    keras.utils.set_random_seed(2)
    model = kp.models.PQCL(backbone(), base="dino", **HEAD, **DISTILL, teacher_query_temp=0.04)
    return model, distill(model, batch)


# ------------------------------------------------------------- sin-cos in keras.ops
def test_sincos_embedding_matches_numpy():
    rng = np.random.default_rng(0)
    coords = rng.uniform(-3, 17, size=(2, 5, 7, 2)).astype("float32")
    got = _np(sincos_embedding(coords, 32))
    assert got.shape == (2, 5, 7, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, sincos_from_coords(coords[..., 0], coords[..., 1], 32), atol=2e-5)
    # Integer (column, row) positions give the backbone's fixed table, row-major.
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    grid = np.stack([cols.ravel(), rows.ravel()], -1)
    np.testing.assert_allclose(_np(sincos_embedding(grid, 32)), sincos_grid(4, 4, 32)[1:], atol=1e-6)
    # The same as the pipeline's TF tables.
    np.testing.assert_allclose(got, kp.data.sincos_tables(coords, 32).numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_embedding(coords, 30)


# --------------------------------------------------------------------- training
def _assert_learns(history, terms, first=None):
    """Every term falls from its first epoch to the last (``first``: term -> epoch, default
    0); the total by a quarter at least."""
    first = first or {}
    for name in ("loss",) + terms:
        values, start = history[name], first.get(name, 0)
        assert len(values) == EPOCHS and np.all(np.isfinite(values)), (name, values)
        assert values[-1] < values[start], (name, values)
    start = first.get("loss", 0)
    assert history["loss"][-1] < 0.75 * history["loss"][start], history["loss"]


def test_ibot_fit_lowers_loss(ibot_run):
    model, history = ibot_run
    _assert_learns(history, ("cls", "mim"))
    for name in ("teacher_temp", "teacher_patch_temp"):
        assert history[name] == pytest.approx([0.04] * EPOCHS)
    assert history["masked_fraction"][0] > 0
    assert 0 < history["teacher_entropy"][0] <= math.log(HEAD["out_dim"]) + 1e-4
    assert not {"query", "query_agreement"} & set(history)


def test_pqcl_fit_lowers_loss(pqcl_run):
    model, history, _, _ = pqcl_run
    # MIM starts at epoch 1: the total and the MIM term fall from then on.
    _assert_learns(history, ("cls", "mim", "query"), first={"loss": 1, "mim": 1})
    for name in ("teacher_temp", "teacher_patch_temp", "teacher_query_temp"):
        assert history[name] == pytest.approx([0.04] * EPOCHS)
    assert all(0.0 <= a <= 1.0 for a in history["query_agreement"])


def test_pqcl_dino_base_fit_lowers_loss(pqcl_dino_run):
    model, history = pqcl_dino_run
    _assert_learns(history, ("cls", "query"))
    assert not {"mim", "masked_fraction", "teacher_patch_temp"} & set(history)
    # No MIM: there is no patch term (nor its center) at all.
    assert "mim" not in [t.log_name for t in model.terms]


def test_teacher_is_not_trained(pqcl_run):
    model = pqcl_run[0]
    teacher_ids = {id(v) for v in model.teacher_backbone.weights + model.teacher_head.weights}
    assert not teacher_ids & {id(v) for v in model.trainable_variables}
    # The PQCL head is fully shared: one last layer for CLS, patches and queries.
    assert model.student_head.last_layer2 is None
    assert model.frozen_variables() == list(model.student_head.last_layer.trainable_variables)


# ------------------------------------------------------- queries, image tokens
def student_logits(model, images, masks=None, query_coords=None):
    """The student's logits of ``images``, with PQCL's query tokens at ``query_coords``."""
    queries = None
    if query_coords is not None:
        codes = sincos_embedding(query_coords, model.student_backbone.embed_dim)
        queries = model.student_backbone.positional_queries(codes)
    return encode(model.student_backbone, model.student_head, images, masks=masks, queries=queries)


def teacher_logits(model, images):
    return encode(model.teacher_backbone, model.teacher_head, images)


def _views(data):
    """Both global views of the batch, crop-major (the shapes of the train step, whose
    eager ops JAX has then compiled once): images ``(2B, S, S, 3)``, masks ``(2B, h, w)``
    and each view's query coordinates ``(2B, T, 2)``."""
    swap = lambda x: np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])  # noqa: E731
    coords = data["query_coords"].reshape(BATCH, 2, -1, 2)
    return swap(data["global_crops"]), swap(data["global_masks"]), swap(coords)


def test_queries_leave_image_logits_unchanged(pqcl_run, batch):
    model = pqcl_run[0]
    images, masks, coords = _views(batch)
    plain = student_logits(model, images, masks=masks)
    with_queries = student_logits(model, images, masks=masks, query_coords=coords)
    assert tuple(with_queries["queries"].shape) == (2 * BATCH, N_LOCAL * (LOCAL // PATCH) ** 2, HEAD["out_dim"])
    for key in ("cls", "patches"):
        np.testing.assert_allclose(_np(with_queries[key]), _np(plain[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    # The queries do read the image: other images give other query logits.
    other = student_logits(model, images[::-1], masks=masks, query_coords=coords)
    assert np.abs(_np(other["queries"]) - _np(with_queries["queries"])).max() > 1e-4


def test_query_tokens_are_mask_token_plus_sincos_crop_major(pqcl_run, batch):
    model = pqcl_run[0]
    data = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
    from_coords, teacher = model.term("query").query_tokens(model, StepOutputs(data, 0, 2, BATCH))
    assert teacher is None  # the teacher sees no queries: its targets are the local crops' patches
    assert tuple(from_coords.shape) == (2 * BATCH, N_LOCAL * 4, 32)
    # Crop-major: row g * B + b holds view g of image b, local crops one after another.
    expected = sincos_from_coords(*np.moveaxis(batch["query_coords"][1, 1].reshape(-1, 2), -1, 0), 32)
    np.testing.assert_allclose(
        _np(from_coords[BATCH + 1]), expected + _np(model.student_backbone.mask_token), atol=2e-5
    )


def _bilinear(table, x, y):
    """NumPy bilinear read of ``table`` ``(h, w, D)`` at ``(x, y)``, clamped to the grid."""
    h, w, _ = table.shape
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    return top * (1 - fy) + (table[y1, x0] * (1 - fx) + table[y1, x1] * fx) * fy


def test_sample_table_matches_numpy_and_is_exact_on_cells():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 5, 8)).astype("float32")
    coords = np.stack([rng.uniform(-1.5, 6.0, 50), rng.uniform(-1.0, 4.0, 50)], -1).astype("float32")
    got = _np(sample_table(ops.convert_to_tensor(table), ops.convert_to_tensor(coords)))
    np.testing.assert_allclose(got, _bilinear(table, coords[:, 0], coords[:, 1]), atol=1e-6)
    cells = np.array([[4.0, 2.0], [0.0, 1.0]], "float32")  # (x, y) on cell centres
    np.testing.assert_array_equal(_np(sample_table(table, cells)), table[[2, 1], [4, 0]])


def test_table_position_code_reads_a_learned_table(batch):
    """``query_position_code="table"``: PQCL on a learned table (DINOv2 weights). A query is
    ``mask_token`` + the backbone's table, resampled to the global grid, read bilinearly at
    the patch's place; the model builds, declares no sin-cos need, and trains finitely."""
    model = kp.models.PQCL(backbone("learned"), **HEAD, query_position_code="table")
    assert kp.models.PQCL.needs(query_position_code="table").pos_embed is None
    data = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
    tokens, _ = model.term("query").query_tokens(model, StepOutputs(data, 0, 2, BATCH))
    grid = GLOBAL // PATCH
    table = _np(model.student_backbone.position_embedding((grid, grid)))[0, 1:].reshape(grid, grid, 32)
    coords = batch["query_coords"][1, 1].reshape(-1, 2)
    expected = _bilinear(table, coords[:, 0], coords[:, 1]) + _np(model.student_backbone.mask_token)
    np.testing.assert_allclose(_np(tokens[BATCH + 1]), expected, atol=1e-5)
    assert kp.models.PQCL.from_config(model.get_config()).term("query").position_code == "table"
    history = distill(model, batch)
    assert np.isfinite(history["query"]).all()
    with pytest.raises(ValueError, match="position_code must be one of"):
        kp.models.PQCL(backbone("learned"), **HEAD, query_position_code="learned")


# ------------------------------------------- the loss against a per-view recomputation
def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ce(p, log_q):
    return -(p * log_q).sum(-1)


@pytest.mark.parametrize("base, local_cls_terms", [("ibot", True), ("dino", False)])
def test_loss_terms_match_image_major_recomputation(base, local_cls_terms, pqcl_run, pqcl_dino_run, batch):
    """``ssl_forward`` against the iBOT and PQCL loss formulas, from networks run on
    the crops in *image-major* order (the step uses crop-major order): catches any mix-up
    of views, local crops, masks or queries. (Same batch sizes as the step, so that JAX's
    eager mode reuses the step's compiled ops.)"""
    trained = (pqcl_run if base == "ibot" else pqcl_dino_run)[0]
    # A copy of the trained model (weights and centers), so the fixtures stay untouched.
    model = kp.models.PQCL(backbone(), base=base, local_cls_terms=local_cls_terms, **HEAD)
    model.set_weights(trained.get_weights())
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=1e-3))  # the logs read the optimizer
    f64 = lambda x: _np(x).astype(np.float64)  # noqa: E731
    c, c3 = f64(model.term("cls").center), f64(model.term("query").center)
    c2 = f64(model.term("mim").center) if base == "ibot" else None
    tau_s, tau = 0.1, 0.04  # epoch 0 of every warm-up
    k = HEAD["out_dim"]

    # Row b * 2 + g holds view g of image b; row b * n + i local crop i of image b.
    images = batch["global_crops"].reshape(2 * BATCH, GLOBAL, GLOBAL, 3)
    masks = batch["global_masks"].reshape(BATCH, 2, -1)
    coords = batch["query_coords"].reshape(2 * BATCH, -1, 2)
    locals_ = batch["local_crops"].reshape(N_LOCAL * BATCH, LOCAL, LOCAL, 3)
    student = student_logits(
        model, images, masks=masks.reshape(2 * BATCH, -1) if base == "ibot" else None, query_coords=coords
    )

    def per_image(out):  # (2B, ...) -> (B, 2, ...)
        return {name: f64(v).reshape((BATCH, 2) + tuple(v.shape[1:])) for name, v in out.items()}

    student, teacher = per_image(student), per_image(teacher_logits(model, images))
    local_patches = model.teacher_backbone(locals_)["patches"]
    targets = f64(model.teacher_head.token_logits(local_patches)).reshape(BATCH, -1, k)  # crop 0's patches first

    s_cls = [student["cls"][:, g] for g in range(2)]
    if local_cls_terms:
        local_cls = f64(model.student_head.token_logits(model.student_backbone(locals_)["cls"]))
        s_cls += list(np.moveaxis(local_cls.reshape(BATCH, N_LOCAL, k), 1, 0))
    p_cls = [_softmax((teacher["cls"][:, g] - c) / tau) for g in range(2)]
    log_q = [_log_softmax(s / tau_s) for s in s_cls]
    pairs = [_ce(p_cls[q], log_q[v]).mean() for q in range(2) for v in range(len(s_cls)) if v != q]
    expected = {"cls": np.mean(pairs)}
    p_query = _softmax((targets - c3) / tau)
    expected["query"] = np.mean([_ce(p_query, _log_softmax(student["queries"][:, g] / tau_s)).mean() for g in range(2)])
    if base == "ibot":
        per_view = []
        for g in range(2):
            p_patch = _softmax((teacher["patches"][:, g] - c2) / tau)
            ce = _ce(p_patch, _log_softmax(student["patches"][:, g] / tau_s))
            m = masks[:, g].astype(np.float64)
            per_view.append(((ce * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).mean())
        expected["mim"] = np.mean(per_view)

    loss, logs = model.ssl_forward(batch, 0, training=False)
    for name, value in expected.items():
        assert float(_np(logs[name])) == pytest.approx(value, rel=1e-4), name
    assert float(_np(loss)) == pytest.approx(sum(expected.values()), rel=1e-4)
    assert ("mim" in logs) == (base == "ibot")


# ------------------------------------------------ centers and pred_start_epoch
class CenterRecorder(keras.callbacks.Callback):
    """After every step: the three centers and the logs; and the centers expected after
    the *next* step, ``c <- m c + (1 - m) mean(raw teacher logits)`` with the teacher as it
    is now (after this step's EMA) on the (fixed) batch."""

    def __init__(self, batch, checked_steps):
        super().__init__()
        self.batch = batch
        self.checked_steps = checked_steps  # eager forward passes are slow on JAX
        self.steps = []

    def centers(self):
        m = self.model
        return [_np(m.term(name).center) for name in ("cls", "mim", "query")]

    def expected_next(self, previous):
        m = self.model
        teacher = teacher_logits(m, kp.models.crop_major(ops.convert_to_tensor(self.batch["global_crops"])))
        local = m.teacher_local_patches(ops.convert_to_tensor(self.batch["local_crops"]))
        means = [
            _np(teacher["cls"]).astype(np.float64).mean(0, keepdims=True),
            _np(teacher["patches"]).astype(np.float64).mean((0, 1))[None, None],
            _np(local).astype(np.float64).mean((0, 1))[None, None],
        ]
        mom = CENTER_MOMENTUM
        return [mom * c + (1.0 - mom) * mean for c, mean in zip(previous, means)]

    def on_train_begin(self, logs=None):
        self.initial = self.centers()
        self.expected = [self.expected_next(self.initial)]

    def on_train_batch_end(self, batch, logs=None):
        centers = self.centers()
        self.steps.append(dict(centers=centers, logs={k: float(_np(v)) for k, v in logs.items()}))
        if len(self.steps) < self.checked_steps:
            self.expected.append(self.expected_next(centers))


def test_three_centers_update_once_per_step(pqcl_run):
    rec = pqcl_run[2]
    for c in rec.initial:
        np.testing.assert_array_equal(c, 0.0)
    assert len(rec.steps) == EPOCHS * STEPS and len(rec.expected) == 3
    names = ("center", "center2", "query center")
    for i, (snap, expected) in enumerate(zip(rec.steps, rec.expected)):
        for name, got, want in zip(names, snap["centers"], expected):
            assert np.abs(got).max() > 1e-7, (name, i)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=f"{name} after step {i}")
    for i in range(1, len(rec.steps)):  # every later step moves every center
        for name, before, after in zip(names, rec.steps[i - 1]["centers"], rec.steps[i]["centers"]):
            assert np.abs(after - before).max() > 1e-9, (name, i)


def test_pred_start_epoch_switches_masks_on(pqcl_run):
    history, rec = pqcl_run[1], pqcl_run[2]
    logs = [s["logs"] for s in rec.steps]
    for i, log in enumerate(logs):
        if i < STEPS:  # epoch 0: masks off, no MIM term
            assert log["masked_fraction"] == 0.0 and log["mim"] == 0.0, (i, log)
        else:
            assert log["masked_fraction"] > 0.0 and log["mim"] > 0.0, (i, log)
    assert history["mim"][0] == 0.0 and min(history["mim"][1:]) > 0
    for name in ("loss", "cls", "query", "query_agreement", "teacher_entropy"):
        assert np.all(np.isfinite(history[name])), name


def test_temperature_schedules():
    """The CLS temperature warms up from epoch 0; the patch and query temperatures are held
    until ``pred_start_epoch`` and warm up from there (iBOT, PQCL)."""
    model = kp.models.PQCL(
        backbone(),
        **HEAD,
        pred_start_epoch=2,
        warmup_teacher_temp_epochs=3,
        teacher_temp=0.07,
        teacher_patch_temp=0.06,
        teacher_query_temp=0.05,
    )
    model.schedules.steps_per_epoch.assign(2.0)
    epochs = np.arange(8)

    def schedule(final, start_epoch=0):
        warm = np.linspace(0.04, final, 3)
        e = np.maximum(epochs - start_epoch, 0)
        return np.where(e < 3, warm[np.minimum(e, 2)], final)

    for name, want in (
        ("teacher_temp", schedule(0.07)),
        ("teacher_query_temp", schedule(0.05, start_epoch=2)),
        ("teacher_patch_temp", schedule(0.06, start_epoch=2)),
    ):
        got = [float(_np(model.schedules.values(2 * e + 1)[name])) for e in epochs]  # last step of each epoch
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("pred_start_epoch", [0, 3])
def test_query_temperature_is_delayed_by_pred_start_epoch(pred_start_epoch):
    """The query teacher temperature per epoch, as the PQCL code builds it: held at the
    warm-up value for ``pred_start_epoch`` epochs, then linspace over the warm-up epochs,
    then constant; read at the first, a middle and the last step of every epoch."""
    start, final, warm, epochs, steps = 0.04, 0.07, 4, 10, 3
    model = kp.models.PQCL(
        backbone(),
        **HEAD,
        pred_start_epoch=pred_start_epoch,
        warmup_teacher_temp_epochs=warm,
        warmup_teacher_query_temp=start,
        teacher_query_temp=final,
    )
    model.schedules.steps_per_epoch.assign(float(steps))
    per_epoch = np.concatenate(
        [
            np.full(pred_start_epoch, start),
            np.linspace(start, final, warm),
            np.full(epochs - warm - pred_start_epoch, final),
        ]
    )
    assert per_epoch.shape == (epochs,)
    for step in range(epochs * steps):
        got = float(_np(model.schedules.values(step)["teacher_query_temp"]))
        assert got == pytest.approx(per_epoch[step // steps], rel=1e-6), step
    # Past the end of the schedule it stays at the final value.
    assert float(_np(model.schedules.values(5 * epochs * steps)["teacher_query_temp"])) == pytest.approx(
        final, rel=1e-6
    )


# ------------------------------------------------------------------ save/load
def _outputs(model, data):
    images, masks, coords = _views(data)
    student = student_logits(model, images, masks=masks)
    teacher = teacher_logits(model, images)
    out = dict(
        call=model(images),
        student_cls=student["cls"],
        student_patches=student["patches"],
        teacher_cls=teacher["cls"],
        teacher_patches=teacher["patches"],
        center=model.term("cls").center,
        center2=model.term("mim").center,
    )
    if isinstance(model, kp.models.PQCL):
        out["student_queries"] = student_logits(model, images, masks=masks, query_coords=coords)["queries"]
        out["teacher_local"] = model.teacher_local_patches(data["local_crops"])
        out["query_center"] = model.term("query").center
    return {k: _np(v) for k, v in out.items()}


def _assert_same_outputs(loaded, model, data):
    expected = _outputs(model, data)
    assert np.abs(expected["student_cls"] - expected["teacher_cls"]).max() > 1e-5
    for name, value in _outputs(loaded, data).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_pqcl_save_load(pqcl_run, batch):
    model, path = pqcl_run[0], pqcl_run[3]
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kp.models.PQCL)
    config = loaded.get_config()
    assert config["base"] == "ibot" and config["pred_start_epoch"] == 1 and "shared_head" not in config
    assert int(_np(loaded.optimizer.iterations)) == EPOCHS * STEPS
    assert np.abs(_np(loaded.term("query").center)).max() > 0
    _assert_same_outputs(loaded, model, batch)


def test_ibot_save_load(ibot_run, batch, tmp_path):
    model = ibot_run[0]
    path = str(tmp_path / "ibot.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kp.models.IBOT)
    assert loaded.get_config()["center_momentum"] == 1.0
    _assert_same_outputs(loaded, model, batch)


def test_pqcl_dino_config_round_trip(pqcl_dino_run):
    model = pqcl_dino_run[0]
    clone = kp.models.PQCL.from_config(model.get_config())
    assert clone.get_config()["base"] == "dino" and "mim" not in clone.trackers
    assert clone.get_config()["backbone"] == model.get_config()["backbone"]


# ------------------------------------------------------------------- errors
def test_missing_batch_keys_are_clear_errors(ibot_run, pqcl_run, pqcl_dino_run, batch):
    data = batch
    without = lambda key: {k: v for k, v in data.items() if k != key}  # noqa: E731
    with pytest.raises(ValueError, match="global_masks.*MaskConfig"):
        ibot_run[0].ssl_forward(without("global_masks"), 0)
    with pytest.raises(ValueError, match="global_masks.*MaskConfig"):
        pqcl_run[0].ssl_forward(without("global_masks"), 0)
    for model in (pqcl_run[0], pqcl_dino_run[0]):
        with pytest.raises(ValueError, match="query_coords.*QueryConfig"):
            model.ssl_forward(without("query_coords"), 0)
        with pytest.raises(ValueError, match="local_crops"):
            model.ssl_forward(without("local_crops"), 0)
    # Masks or queries made for another patch size.
    bad = dict(data, global_masks=np.zeros((BATCH, 2, 2, 2), bool))
    with pytest.raises(ValueError, match="MaskConfig\\(patch_size=8\\)"):
        ibot_run[0].ssl_forward(bad, 0)
    bad = dict(data, query_coords=np.zeros((BATCH, 2, N_LOCAL, 1, 2), "float32"))
    with pytest.raises(ValueError, match="QueryConfig\\(patch_size=8\\)"):
        pqcl_run[0].ssl_forward(bad, 0)


def test_backbone_requirements_are_clear_errors():
    no_mask = backbone(use_mask_token=False)
    for cls in (kp.models.IBOT, kp.models.PQCL):
        with pytest.raises(ValueError, match="use_mask_token=True"):
            cls(no_mask, **HEAD)
    with pytest.raises(ValueError, match="pos_embed='sincos'.*position_code='table'"):
        kp.models.PQCL(backbone("learned"), **HEAD)
    with pytest.raises(ValueError, match="base must be one of"):
        kp.models.PQCL(no_mask, base="mae", **HEAD)
