"""iBOTHead, iBOTLoss and the PQCL QueryLoss vs NumPy."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_pqcl.heads import iBOTHead
from keras_pqcl.losses import QueryLoss, iBOTLoss, query_agreement

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING

# 2 global views, 2 local crops of 2x2 patches (T = 2 * 2 * 2 queries), 2x3 patch grid.
G, N_LOCAL, B, GRID_H, GRID_W, K, KP, L = 2, 2, 3, 2, 3, 7, 5, 2
V, N, T = G + N_LOCAL, GRID_H * GRID_W, N_LOCAL * L * L
TAU_S = 0.1


# ----------------------------------------------------------------------------- references
def ce(teacher_logits, center, teacher_temp, student_logits, student_temp=TAU_S):
    """-sum_k softmax((t - c) / tau_t)_k log softmax(s / tau_s)_k over the last axis."""
    p = H.softmax((np.asarray(teacher_logits, np.float64) - center) / teacher_temp)
    return -np.sum(p * H.log_softmax(np.asarray(student_logits, np.float64) / student_temp), axis=-1)


def numpy_cls_loss(student, teacher, center, teacher_temp):
    """Mean over the pairs (q global, v != q) of the batch-mean cross-entropy."""
    terms = [
        np.mean(ce(teacher[q], center, teacher_temp, student[v]))
        for q in range(teacher.shape[0])
        for v in range(student.shape[0])
        if v != q
    ]
    assert len(terms) == 2 * student.shape[0] - 2
    return np.mean(terms)


def numpy_mim_loss(student, teacher, masks, center2, patch_temp):
    """Per view and image: masked-patch CE sum / max(1, #masked); mean over images, views."""
    per_view = []
    for g in range(teacher.shape[0]):
        per_image = []
        for b in range(teacher.shape[1]):
            m = masks[g, b].reshape(-1).astype(np.float64)
            loss = ce(teacher[g, b], center2[0], patch_temp, student[g, b])  # (N,)
            per_image.append(np.sum(m * loss) / max(1.0, m.sum()))
        per_view.append(np.mean(per_image))
    return np.mean(per_view)


def numpy_query_loss(student, teacher, center3, query_temp):
    """mean_g mean_{b,t} CE(P[b, t], S_g[b, t])."""
    return np.mean([np.mean(ce(teacher, center3, query_temp, student[g])) for g in range(student.shape[0])])


def numpy_ema(center, logits, momentum=0.9):
    """``m c + (1 - m) mean(t)`` over every axis but the last."""
    batch_mean = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1]).mean(0)
    return momentum * center + (1 - momentum) * batch_mean.reshape(center.shape)


def _ibot_data(seed=0):
    rng = np.random.default_rng(seed)
    data = dict(
        student_cls=rng.normal(size=(V, B, K)),
        teacher_cls=rng.normal(size=(G, B, K)) * 0.2,
        student_patches=rng.normal(size=(G, B, N, KP)),
        teacher_patches=rng.normal(size=(G, B, N, KP)) * 0.2,
    )
    data = {k: v.astype("float32") for k, v in data.items()}
    masks = rng.uniform(size=(G, B, N)) < 0.5
    masks[0, 1] = False  # an image with no masked patch: contributes 0, counts in the mean
    masks[1, 0] = True  # every patch masked
    masks[1, 2] = False
    masks[1, 2, 3] = True  # exactly one
    data["masks"] = masks
    centers = ((rng.normal(size=(1, K)) * 0.1), (rng.normal(size=(1, 1, KP)) * 0.1))
    return data, tuple(c.astype("float32") for c in centers)


def _tensors(data):
    return {k: ops.convert_to_tensor(v) for k, v in data.items()}


def _ibot_refs(data, center, center2, teacher_temp, patch_temp):
    d = {k: np.asarray(v, np.float64) for k, v in data.items()}
    return (
        numpy_cls_loss(d["student_cls"], d["teacher_cls"], center, teacher_temp),
        numpy_mim_loss(d["student_patches"], d["teacher_patches"], data["masks"], center2, patch_temp),
    )


# ----------------------------------------------------------------------------- iBOTLoss
def test_ibot_loss_matches_numpy_and_updates_centers_after_the_loss():
    data, (center, center2) = _ibot_data()
    loss_fn = iBOTLoss(out_dim=K, patch_out_dim=KP)
    assert tuple(loss_fn.center.shape) == (1, K) and tuple(loss_fn.center2.shape) == (1, 1, KP)
    np.testing.assert_array_equal(to_numpy(loss_fn.center), np.zeros((1, K)))
    np.testing.assert_array_equal(to_numpy(loss_fn.center2), np.zeros((1, 1, KP)))
    loss_fn.center.assign(center)
    loss_fn.center2.assign(center2)

    temp = ops.convert_to_tensor(0.04, dtype="float32")
    out = loss_fn(**_tensors(data), teacher_temp=temp, teacher_patch_temp=0.06)
    assert sorted(out) == ["cls", "mim"]
    for value in out.values():
        assert tuple(value.shape) == () and keras.backend.standardize_dtype(value.dtype) == "float32"
    # The loss is centred with the centers set *before* the call (previous step's).
    ref_cls, ref_mim = _ibot_refs(data, center, center2, 0.04, 0.06)
    np.testing.assert_allclose(float(to_numpy(out["cls"])), ref_cls, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(out["mim"])), ref_mim, rtol=1e-5)

    # Then both centers move: CLS over (G, B); patches over (G, B, N), masked or not.
    new_center = numpy_ema(center.astype(np.float64), data["teacher_cls"])
    new_center2 = numpy_ema(center2.astype(np.float64), data["teacher_patches"])
    np.testing.assert_allclose(to_numpy(loss_fn.center), new_center, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(loss_fn.center2), new_center2, rtol=1e-5, atol=1e-7)

    # The next call uses the updated centers; masks may come as (G, B, h, w) grids.
    data2 = dict(data, masks=data["masks"].reshape(G, B, GRID_H, GRID_W))
    out2 = loss_fn(**_tensors(data2), teacher_temp=0.07, teacher_patch_temp=0.07, update_center=False)
    ref_cls2, ref_mim2 = _ibot_refs(data, new_center, new_center2, 0.07, 0.07)
    np.testing.assert_allclose(float(to_numpy(out2["cls"])), ref_cls2, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(out2["mim"])), ref_mim2, rtol=1e-5)


def test_ibot_loss_without_center_update_and_float_masks():
    data, (center, center2) = _ibot_data(1)
    loss_fn = iBOTLoss(out_dim=K, patch_out_dim=KP, student_temp=0.2)
    loss_fn.center.assign(center)
    loss_fn.center2.assign(center2)
    data = dict(data, masks=data["masks"].astype("float32"))  # 0/1 instead of bool
    out = loss_fn(**_tensors(data), teacher_temp=0.05, teacher_patch_temp=0.04, update_center=False)
    d = {k: np.asarray(v, np.float64) for k, v in data.items()}
    ref_cls = np.mean(
        [
            np.mean(ce(d["teacher_cls"][q], center, 0.05, d["student_cls"][v], 0.2))
            for q in range(G)
            for v in range(V)
            if v != q
        ]
    )
    np.testing.assert_allclose(float(to_numpy(out["cls"])), ref_cls, rtol=1e-5)
    # Per image: masked sum / max(1, count), written out without the helper's loops.
    loss = ce(d["teacher_patches"], center2, 0.04, d["student_patches"], 0.2)  # (G, B, N)
    m = data["masks"]
    ref_mim = np.mean((loss * m).sum(-1) / np.maximum(m.sum(-1), 1.0))
    np.testing.assert_allclose(float(to_numpy(out["mim"])), ref_mim, rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(loss_fn.center), center)
    np.testing.assert_array_equal(to_numpy(loss_fn.center2), center2)


def test_ibot_mim_counts_unmasked_images_in_the_mean():
    """One masked patch in the whole batch: L_mim = its CE / (B * G), not its CE."""
    data, _ = _ibot_data(2)
    masks = np.zeros((G, B, N), bool)
    masks[1, 2, 4] = True
    loss_fn = iBOTLoss(out_dim=K, patch_out_dim=KP)
    out = loss_fn(**_tensors(dict(data, masks=masks)), teacher_temp=0.04, teacher_patch_temp=0.04)
    one = ce(data["teacher_patches"][1, 2, 4], 0.0, 0.04, data["student_patches"][1, 2, 4])
    np.testing.assert_allclose(float(to_numpy(out["mim"])), one / (B * G), rtol=1e-5)
    # No mask at all: 0, and the patch center still moves with every teacher patch.
    loss_fn = iBOTLoss(out_dim=K, patch_out_dim=KP)
    out = loss_fn(**_tensors(dict(data, masks=np.zeros((G, B, N), bool))), teacher_temp=0.04, teacher_patch_temp=0.04)
    assert float(to_numpy(out["mim"])) == 0.0
    np.testing.assert_allclose(
        to_numpy(loss_fn.center2), numpy_ema(np.zeros((1, 1, KP)), data["teacher_patches"]), rtol=1e-5, atol=1e-7
    )


def test_ibot_loss_pqcl_globals_only():
    """PQCL: the student sees only the G global views, so L_cls has the 2 cross pairs."""
    data, (center, center2) = _ibot_data(3)
    data = dict(data, student_cls=data["student_cls"][:G])
    loss_fn = iBOTLoss(out_dim=K)  # patch_out_dim defaults to K
    assert loss_fn.patch_out_dim == K
    data["student_patches"] = data["student_patches"][..., :1].repeat(K, -1) + np.arange(K, dtype="float32")
    data["teacher_patches"] = np.random.default_rng(4).normal(size=(G, B, N, K)).astype("float32")
    loss_fn.center.assign(center)
    out = loss_fn(**_tensors(data), teacher_temp=0.04, teacher_patch_temp=0.05)
    s, t = data["student_cls"].astype(np.float64), data["teacher_cls"].astype(np.float64)
    ref = np.mean([np.mean(ce(t[0], center, 0.04, s[1])), np.mean(ce(t[1], center, 0.04, s[0]))])
    np.testing.assert_allclose(float(to_numpy(out["cls"])), ref, rtol=1e-5)
    ref_mim = numpy_mim_loss(data["student_patches"], data["teacher_patches"], data["masks"], np.zeros((1, 1, K)), 0.05)
    np.testing.assert_allclose(float(to_numpy(out["mim"])), ref_mim, rtol=1e-5)


def test_ibot_loss_config_and_shape_errors():
    loss_fn = iBOTLoss(out_dim=K, patch_out_dim=KP, student_temp=0.2, center_momentum=0.5, name="ibot")
    assert [v.path for v in loss_fn.weights] == ["ibot/cls_loss/center", "ibot/patch_loss/center"]
    clone = iBOTLoss.from_config(loss_fn.get_config())
    assert (clone.out_dim, clone.patch_out_dim, clone.student_temp, clone.center_momentum) == (K, KP, 0.2, 0.5)
    assert clone.cls_loss.center_momentum == 0.5 and clone.patch_loss.student_temp == 0.2
    data, _ = _ibot_data()
    with pytest.raises(ValueError, match="global views"):
        loss_fn(**_tensors(dict(data, teacher_cls=data["teacher_cls"][:1])), teacher_temp=0.04, teacher_patch_temp=0.04)
    with pytest.raises(ValueError, match=r"\(G, B, N, K_p\)"):
        loss_fn(
            **_tensors(dict(data, teacher_patches=data["teacher_patches"][:, :, 0])),
            teacher_temp=0.04,
            teacher_patch_temp=0.04,
        )


# ----------------------------------------------------------------------------- QueryLoss
def _query_data(seed=5):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(G, B, T, K)).astype("float32")
    teacher = (rng.normal(size=(B, T, K)) * 0.2).astype("float32")
    center3 = (rng.normal(size=(1, 1, K)) * 0.1).astype("float32")
    return student, teacher, center3


def test_query_loss_matches_numpy_and_updates_center_after_the_loss():
    student, teacher, center3 = _query_data()
    loss_fn = QueryLoss(out_dim=K)
    assert tuple(loss_fn.center.shape) == (1, 1, K)
    loss_fn.center.assign(center3)
    loss = loss_fn(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.05)
    assert tuple(loss.shape) == ()
    ref = numpy_query_loss(student.astype(np.float64), teacher.astype(np.float64), center3, 0.05)
    np.testing.assert_allclose(float(to_numpy(loss)), ref, rtol=1e-5)
    new_center = numpy_ema(center3.astype(np.float64), teacher)  # mean over (B, T)
    np.testing.assert_allclose(to_numpy(loss_fn.center), new_center, rtol=1e-5, atol=1e-7)
    # Next step: centred with the updated center; update_center=False leaves it alone.
    loss2 = loss_fn(
        ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.07, update_center=False
    )
    ref2 = numpy_query_loss(student.astype(np.float64), teacher.astype(np.float64), new_center, 0.07)
    np.testing.assert_allclose(float(to_numpy(loss2)), ref2, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(loss_fn.center), new_center, rtol=1e-5, atol=1e-7)


def test_query_loss_per_view_and_momentum():
    """Written out per (g, b, t) with a custom student temperature and momentum."""
    student, teacher, center3 = _query_data(6)
    loss_fn = QueryLoss(out_dim=K, student_temp=0.3, center_momentum=0.5)
    loss_fn.center.assign(center3)
    loss = loss_fn(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.04)
    terms = np.zeros((G, B, T))
    for g in range(G):
        for b in range(B):
            for t in range(T):
                p = H.softmax((teacher[b, t].astype(np.float64) - center3[0, 0]) / 0.04)
                terms[g, b, t] = -np.dot(p, H.log_softmax(student[g, b, t].astype(np.float64) / 0.3))
    np.testing.assert_allclose(float(to_numpy(loss)), terms.mean(axis=(1, 2)).mean(), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(loss_fn.center), numpy_ema(center3.astype(np.float64), teacher, 0.5), rtol=1e-5, atol=1e-7
    )
    clone = QueryLoss.from_config(loss_fn.get_config())
    assert (clone.out_dim, clone.student_temp, clone.center_momentum) == (K, 0.3, 0.5)
    assert tuple(clone.center.shape) == (1, 1, K)
    with pytest.raises(ValueError, match="same T"):
        loss_fn(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher[:, :-1]), teacher_temp=0.04)


def numpy_agreement(student_scores, teacher_scores):
    hits = [
        np.argmax(student_scores[g, b].mean(0)) == np.argmax(teacher_scores[b].mean(0))
        for g in range(student_scores.shape[0])
        for b in range(student_scores.shape[1])
    ]
    return np.mean(hits)


def test_query_agreement_matches_numpy():
    rng = np.random.default_rng(7)
    batch = 16
    teacher = rng.normal(size=(batch, T, K)).astype("float32")
    # The student agrees on about half the images: the teacher plus noise, or noise alone.
    student = np.stack([teacher + rng.normal(size=teacher.shape) * 0.3, rng.normal(size=teacher.shape)]).astype(
        "float32"
    )
    acc = to_numpy(query_agreement(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher)))
    ref = numpy_agreement(student, teacher)
    assert 0.0 < ref < 1.0
    np.testing.assert_allclose(float(acc), ref, rtol=1e-6)

    # The loss's monitor: the same on the distributions the loss compares.
    center3 = (rng.normal(size=(1, 1, K)) * 0.5).astype("float32")
    loss_fn = QueryLoss(out_dim=K)
    loss_fn.center.assign(center3)
    acc = to_numpy(loss_fn.agreement(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.05))
    p = H.softmax((teacher.astype(np.float64) - center3) / 0.05)
    q = H.softmax(student.astype(np.float64) / TAU_S)
    np.testing.assert_allclose(float(acc), numpy_agreement(q, p), rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(loss_fn.center), center3)  # a monitor changes nothing


# ----------------------------------------------------------------------------- gradients
def _grads(fn, *arrays):
    """Gradients of the scalar ``fn(*tensors)`` w.r.t. each input; zeros where unconnected."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.convert_to_tensor(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = fn(*xs)
        grads = tape.gradient(y, xs)
    elif backend == "jax":
        import jax

        grads = jax.grad(fn, argnums=tuple(range(len(arrays))))(*[jax.numpy.asarray(a) for a in arrays])
    elif backend == "torch":
        import torch

        xs = [torch.tensor(a, requires_grad=True) for a in arrays]
        fn(*xs).backward()
        grads = [x.grad for x in xs]
    else:  # pragma: no cover
        pytest.skip(f"no gradients on {backend}")
    return [np.zeros(a.shape) if g is None else to_numpy(g) for g, a in zip(grads, arrays)]


def test_gradients_reach_the_student_only():
    data, _ = _ibot_data(8)
    ibot = iBOTLoss(out_dim=K, patch_out_dim=KP)
    masks = ops.convert_to_tensor(data["masks"])

    def ibot_total(s_cls, t_cls, s_patch, t_patch):
        out = ibot(
            s_cls, t_cls, s_patch, t_patch, masks, teacher_temp=0.04, teacher_patch_temp=0.04, update_center=False
        )
        return out["cls"] + out["mim"]

    g_scls, g_tcls, g_spatch, g_tpatch = _grads(
        ibot_total, data["student_cls"], data["teacher_cls"], data["student_patches"], data["teacher_patches"]
    )
    assert np.abs(g_scls).max() > 0 and np.abs(g_spatch).max() > 0
    np.testing.assert_array_equal(g_tcls, 0.0)
    np.testing.assert_array_equal(g_tpatch, 0.0)
    # Unmasked student patches get no MIM gradient.
    unmasked = ~data["masks"]
    np.testing.assert_array_equal(g_spatch[unmasked], 0.0)
    assert np.all(np.abs(g_spatch[data["masks"]]).max(-1) > 0)

    student, teacher, _ = _query_data(9)
    query = QueryLoss(out_dim=K)
    g_s, g_t = _grads(lambda s, t: query(s, t, teacher_temp=0.04, update_center=False), student, teacher)
    assert np.all(np.abs(g_s).max(-1) > 0)  # every query is trained
    np.testing.assert_array_equal(g_t, 0.0)


# ----------------------------------------------------------------------------- iBOTHead
D, HIDDEN, BOTTLENECK = 16, 64, 16  # as in test_heads (shared kernel shapes, fewer compiles)


def numpy_bottleneck(head, x):
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(head.mlp):
        h = H.linear(h, *H.dense_weights(layer))
        if i < len(head.mlp) - 1:
            h = H.gelu(h)
    return h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


def numpy_weight_norm(z, layer):
    kernel, gain = H.f64(layer.kernel), H.f64(layer.gain)
    return z @ (kernel / np.linalg.norm(kernel, axis=0, keepdims=True) * gain)


def _tokens(seed=10, batch=2, n=N):
    return np.random.default_rng(seed).normal(size=(batch, 1 + n, D)).astype("float32")


@pytest.mark.parametrize("shared_head", [True, False])
def test_ibot_head_matches_numpy(shared_head):
    rng = np.random.default_rng(11)
    kp = K if shared_head else KP
    with H.no_random_init():  # every weight is overwritten below
        head = iBOTHead(
            out_dim=K,
            hidden_dim=HIDDEN,
            bottleneck_dim=BOTTLENECK,
            norm_last_layer=False,
            patch_out_dim=kp,
            shared_head=shared_head,
        )
        head.build((None, None, D))
    H.randomize(head, rng)  # random gains too (norm_last_layer=False)
    x = _tokens()
    cls, patches = head(ops.convert_to_tensor(x))
    cls, patches = to_numpy(cls), to_numpy(patches)
    assert cls.shape == (2, K) and patches.shape == (2, N, kp)
    z = numpy_bottleneck(head, x)
    np.testing.assert_allclose(cls, numpy_weight_norm(z[:, 0], head.last_layer), rtol=1e-4, atol=1e-5)
    if shared_head:
        assert head.last_layer2 is None and head.patch_layer is head.last_layer
        assert head.last_layers == [head.last_layer]
        # The patch logits are last_layer applied to the patch bottleneck.
        np.testing.assert_allclose(patches, numpy_weight_norm(z[:, 1:], head.last_layer), rtol=1e-4, atol=1e-5)
    else:
        assert head.patch_layer is head.last_layer2 and head.last_layers == [head.last_layer, head.last_layer2]
        assert head.last_layer2.gain.trainable
        np.testing.assert_allclose(patches, numpy_weight_norm(z[:, 1:], head.last_layer2), rtol=1e-4, atol=1e-5)
    # token_logits: every token (CLS, patches, queries) through the MLP and last_layer.
    every = to_numpy(head.token_logits(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(every, numpy_weight_norm(z, head.last_layer), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(every[:, 0], cls, rtol=1e-5, atol=1e-6)


def test_ibot_head_variables_and_errors():
    with H.no_random_init():
        shared = iBOTHead(out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, name="student_head")
        shared.build((None, None, D))
        separate = iBOTHead(
            out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, patch_out_dim=KP, shared_head=False, name="h"
        )
        separate.build((None, None, D))
    layers = ["mlp_0", "mlp_1", "mlp_2", "last_layer"]
    expected = [f"student_head/{n}/{w}" for n in layers[:3] for w in ("kernel", "bias")]
    expected += ["student_head/last_layer/kernel", "student_head/last_layer/gain"]
    assert [v.path for v in shared.weights] == expected
    assert [v.path for v in separate.weights][-4:] == [
        "h/last_layer/kernel",
        "h/last_layer/gain",
        "h/last_layer2/kernel",
        "h/last_layer2/gain",
    ]
    assert tuple(separate.last_layer2.kernel.shape) == (BOTTLENECK, KP)
    assert not separate.last_layer2.gain.trainable  # norm_last_layer=True freezes both gains
    assert shared.patch_out_dim == K
    with pytest.raises(ValueError, match="patch_out_dim must equal out_dim"):
        iBOTHead(out_dim=K, patch_out_dim=KP)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ N, D\)"):
        shared(ops.zeros((2, D)))


@pytest.mark.parametrize("shared_head", [True, False])
def test_ibot_head_config_round_trip(shared_head):
    rng = np.random.default_rng(12)
    kp = K if shared_head else KP
    with H.no_random_init():
        head = iBOTHead(
            out_dim=K,
            hidden_dim=HIDDEN,
            bottleneck_dim=BOTTLENECK,
            num_layers=2,
            patch_out_dim=kp,
            shared_head=shared_head,
            norm_last_layer=False,
        )
        head.build((None, None, D))
    H.randomize(head, rng)
    config = keras.saving.serialize_keras_object(head)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is iBOTHead
    assert clone.get_config() == head.get_config()
    assert clone.built  # rebuilt from the serialized build config
    clone.set_weights(head.get_weights())
    x = ops.convert_to_tensor(_tokens(13))
    for a, b in zip(head(x), clone(x)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_ibot_head_keras_file_round_trip(tmp_path):
    with H.no_random_init():
        head = iBOTHead(out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, patch_out_dim=KP, shared_head=False)
        inputs = keras.Input((1 + N, D))
        model = keras.Model(inputs, head(inputs))
    H.randomize(head, np.random.default_rng(14))
    path = str(tmp_path / "head.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = ops.convert_to_tensor(_tokens(15))
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
