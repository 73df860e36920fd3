"""WeightNormDense and DINOHead vs NumPy."""

import numpy as np
import pytest
from keras import ops

from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.layers import WeightNormDense

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING

# Dims chosen to share kernel shapes with the tiny ViT of the other tests (fewer compiles).
D, HIDDEN, BOTTLENECK, K = 16, 64, 16, 7


def numpy_weight_norm(x, kernel, gain):
    """``x @ (g * V / ||V||)`` with every column (output unit) of V normalised."""
    w = kernel / np.sqrt((kernel**2).sum(axis=0, keepdims=True))
    return np.asarray(x, np.float64) @ (w * gain)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weight_norm_dense_matches_numpy(norm_last_layer):
    rng = np.random.default_rng(0)
    layer = WeightNormDense(K, norm_last_layer=norm_last_layer)
    layer.build((None, BOTTLENECK))
    assert tuple(layer.kernel.shape) == (BOTTLENECK, K) and tuple(layer.gain.shape) == (1, K)
    np.testing.assert_array_equal(to_numpy(layer.gain), np.ones((1, K)))
    trainable = [v.name for v in layer.trainable_weights]
    non_trainable = [v.name for v in layer.non_trainable_weights]
    assert "kernel" in trainable
    if norm_last_layer:
        assert "gain" in non_trainable and "gain" not in trainable
    else:
        assert "gain" in trainable and "gain" not in non_trainable
    # A kernel with very different column norms, and (when trainable) a non-unit gain.
    kernel = rng.normal(size=(BOTTLENECK, K)) * rng.uniform(0.1, 10.0, size=(1, K))
    layer.kernel.assign(kernel.astype("float32"))
    if not norm_last_layer:
        layer.gain.assign(rng.uniform(0.5, 2.0, size=(1, K)).astype("float32"))
    x = rng.normal(size=(2, 5, BOTTLENECK)).astype("float32")
    out = to_numpy(layer(ops.convert_to_tensor(x)))
    assert out.shape == (2, 5, K)
    ref = numpy_weight_norm(x, H.f64(layer.kernel), H.f64(layer.gain))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_weight_norm_logits_are_cosines():
    rng = np.random.default_rng(1)
    layer = WeightNormDense(K)
    layer.build((None, BOTTLENECK))
    x = rng.normal(size=(4, BOTTLENECK))
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype("float32")
    out = to_numpy(layer(ops.convert_to_tensor(x)))
    assert np.all(np.abs(out) <= 1.0 + 1e-6)
    v = H.f64(layer.kernel)
    cos = (x @ v) / (np.linalg.norm(x, axis=-1, keepdims=True) * np.linalg.norm(v, axis=0, keepdims=True))
    np.testing.assert_allclose(out, cos, rtol=1e-5, atol=1e-6)


def numpy_dino_head(head, x):
    """Dense layers with exact GELU between them, L2-normalise (eps 1e-12), weight-norm."""
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(head.mlp):
        h = H.linear(h, *H.dense_weights(layer))
        if i < len(head.mlp) - 1:
            h = H.gelu(h)
    h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    return numpy_weight_norm(h, H.f64(head.last_layer.kernel), H.f64(head.last_layer.gain)), h


@pytest.mark.parametrize("num_layers", [3, 1])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_numpy(num_layers, norm_last_layer):
    rng = np.random.default_rng(2)
    head = DINOHead(
        out_dim=K,
        hidden_dim=HIDDEN,
        bottleneck_dim=BOTTLENECK,
        num_layers=num_layers,
        norm_last_layer=norm_last_layer,
    )
    head.build((None, D))
    assert len(head.mlp) == num_layers
    assert [layer.units for layer in head.mlp] == [HIDDEN] * (num_layers - 1) + [BOTTLENECK]
    H.randomize(head, rng)  # also sets a non-unit gain when it is trainable
    assert head.last_layer.gain.trainable == (not norm_last_layer)
    x = rng.normal(size=(2, 5, D)).astype("float32")  # token-wise on 3-D input (iBOT/PQCL)
    out = to_numpy(head(ops.convert_to_tensor(x)))
    assert out.shape == (2, 5, K)
    ref, ref_proj = numpy_dino_head(head, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    proj = to_numpy(head.project(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(proj, ref_proj, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(proj, axis=-1), np.ones((2, 5)), atol=1e-5)
    # 2-D input (CLS features) gives the same rows.
    out2 = to_numpy(head(ops.convert_to_tensor(x[:, 0])))
    np.testing.assert_allclose(out2, out[:, 0], rtol=1e-5, atol=1e-6)


def test_dino_head_init_and_zero_input():
    head = DINOHead(out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    head.build((None, D))
    for layer in head.mlp:
        np.testing.assert_array_equal(to_numpy(layer.bias), np.zeros(layer.units))
    kernel = to_numpy(head.mlp[0].kernel)
    assert abs(kernel.std() - 0.02) < 0.003  # N(0, 0.02^2) like trunc_normal_(std=0.02)
    # Zero features: the eps of the L2 normalisation keeps the output finite (zeros).
    out = to_numpy(head(ops.convert_to_tensor(np.zeros((2, D), "float32"))))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, np.zeros((2, K)))


def test_dino_head_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(out_dim=K, num_layers=0)


def numpy_batch_stat_norm(x, gamma, beta, eps=1e-5):
    """Normalise every channel with the mean and biased variance over all other axes."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_batch_stat_norm_matches_numpy():
    from keras_pqcl.layers import BatchStatNorm

    rng = np.random.default_rng(3)
    layer = BatchStatNorm()
    x = (rng.normal(size=(3, 4, 6)) * rng.uniform(0.01, 5.0, size=(1, 1, 6)) + 2.0).astype("float32")
    layer.build(x.shape)
    assert [v.name for v in layer.trainable_weights] == ["gamma", "beta"] and not layer.non_trainable_weights
    gamma, beta = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    # Statistics over batch and tokens for (B, N, C); over the batch for (B, C).
    np.testing.assert_allclose(
        to_numpy(layer(ops.convert_to_tensor(x))), numpy_batch_stat_norm(x, gamma, beta), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        to_numpy(layer(ops.convert_to_tensor(x[:, 0]))),
        numpy_batch_stat_norm(x[:, 0], gamma, beta),
        rtol=1e-4,
        atol=1e-4,
    )
    # Rows that differ by a few percent (the case it exists for) come out at unit spread.
    close = (1.0 + 0.05 * rng.normal(size=(8, 6))).astype("float32")
    out = to_numpy(BatchStatNorm()(ops.convert_to_tensor(close)))
    np.testing.assert_allclose(out.std(axis=0), np.ones(6), atol=0.02)


def test_dino_head_use_bn_matches_numpy():
    """use_bn_in_head: linear, BatchNorm (batch statistics), GELU for each hidden layer."""
    rng = np.random.default_rng(4)
    head = DINOHead(out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, use_bn=True)
    head.build((None, D))
    assert len(head.norms) == 2
    H.randomize(head, rng)
    x = rng.normal(size=(5, D)).astype("float32")
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(head.mlp):
        h = H.linear(h, *H.dense_weights(layer))
        if i < 2:
            h = H.gelu(numpy_batch_stat_norm(h, H.f64(head.norms[i].gamma), H.f64(head.norms[i].beta)))
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    ref = numpy_weight_norm(h, H.f64(head.last_layer.kernel), H.f64(head.last_layer.gain))
    np.testing.assert_allclose(to_numpy(head(ops.convert_to_tensor(x))), ref, rtol=1e-4, atol=1e-4)
    config = head.get_config()
    assert config["use_bn"] is True
    assert len(DINOHead.from_config(config).norms) == 2
