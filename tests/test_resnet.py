"""ResNet, split BatchNorm and FPN vs NumPy forward passes."""

import contextlib
import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_pqcl as kp
from keras_pqcl.backbones.fpn import nearest_resize
from keras_pqcl.backbones.resnet import SplitBatchNorm

from tests import helpers as H

pytestmark = H.IGNORE_NUMPY2_COPY_WARNING
to_numpy, f64 = H.to_numpy, H.f64


@contextlib.contextmanager
def numpy_init(seed=0):
    """Draw every initial weight with NumPy (same distributions as Keras' initialisers).

    On JAX each new random shape costs an XLA compile; a ResNet has dozens of shapes.
    """
    from keras.src.initializers.random_initializers import compute_fans

    rng = np.random.default_rng(seed)
    classes = (keras.initializers.VarianceScaling, keras.initializers.RandomUniform, keras.initializers.RandomNormal)
    saved = [cls.__call__ for cls in classes]

    def variance_scaling(self, shape, dtype=None):
        fan_in, fan_out = compute_fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        var = self.scale / max(1.0, fan)
        if self.distribution == "uniform":
            limit = math.sqrt(3 * var)
            value = rng.uniform(-limit, limit, size=shape)
        else:
            value = rng.normal(size=shape) * math.sqrt(var)
        return ops.convert_to_tensor(value.astype("float32"), dtype=dtype or "float32")

    def uniform(self, shape, dtype=None):
        value = rng.uniform(self.minval, self.maxval, size=shape)
        return ops.convert_to_tensor(value.astype("float32"), dtype=dtype or "float32")

    def normal(self, shape, dtype=None):
        value = rng.normal(self.mean, self.stddev, size=shape)
        return ops.convert_to_tensor(value.astype("float32"), dtype=dtype or "float32")

    try:
        for cls, call in zip(classes, (variance_scaling, uniform, normal)):
            cls.__call__ = call
        yield
    finally:
        for cls, call in zip(classes, saved):
            cls.__call__ = call


def forward(layer, inputs, training=False):
    """``layer(inputs, training=...)``; on JAX compiled once (eager JAX compiles every op)."""
    if keras.backend.backend() != "jax":
        return layer(inputs, training=training)
    import jax

    def run(trainable, non_trainable, x):
        return layer.stateless_call(trainable, non_trainable, x, training=training)[0]

    values = lambda vs: [v.value for v in vs]  # noqa: E731
    return jax.jit(run)(values(layer.trainable_variables), values(layer.non_trainable_variables), inputs)


def tiny(**kwargs):
    args = dict(depths=(1, 1, 1, 1), width=4)
    args.update(kwargs)
    with numpy_init():
        return kp.backbones.ResNet(**args)


def images(batch, size, seed=0, channels=3):
    return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype("float32")


# ----------------------------------------------------------------------------- NumPy reference
def np_conv(x, kernel, stride=1, pad=0, bias=None):
    """torch Conv2d (symmetric zero padding) on NHWC with an HWIO kernel."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    for a in range(kh):
        for b in range(kw):
            patch = x[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
            out += patch @ kernel[a, b]
    return out if bias is None else out + bias


def np_bn_train(x, layer, groups=1):
    """Batch-statistics BN (biased variance), statistics per group of the batch."""
    g = x.reshape((groups, -1) + x.shape[1:])
    mean = g.mean(axis=(1, 2, 3), keepdims=True)
    var = g.var(axis=(1, 2, 3), keepdims=True)
    y = (g - mean) / np.sqrt(var + layer.epsilon) * f64(layer.gamma) + f64(layer.beta)
    return y.reshape(x.shape)


def np_maxpool(x):
    """torch MaxPool2d(3, stride 2, padding 1): -inf padding."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for a in range(3):
        for b in range(3):
            out = np.maximum(out, x[:, a : a + 2 * (ho - 1) + 1 : 2, b : b + 2 * (wo - 1) + 1 : 2])
    return out


def np_resnet(model, x):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    x = relu(np_bn_train(np_conv(x, f64(model.conv1.kernel), 2, 3), model.bn1))
    x = np_maxpool(x)
    out = {}
    for i, blocks in enumerate(model.stages):
        for blk in blocks:
            y = relu(np_bn_train(np_conv(x, f64(blk.conv1.kernel)), blk.bn1))
            y = relu(np_bn_train(np_conv(y, f64(blk.conv2.kernel), blk.stride, 1), blk.bn2))
            y = np_bn_train(np_conv(y, f64(blk.conv3.kernel)), blk.bn3)
            short = np_bn_train(np_conv(x, f64(blk.down_conv.kernel), blk.stride), blk.down_bn) if blk.downsample else x
            x = relu(y + short)
        out[f"C{i + 2}"] = x
    return out


def randomize_bn(model, rng):
    for v in model.trainable_weights:
        if v.name in ("gamma", "beta"):
            v.assign((rng.normal(size=v.shape) * 0.3 + (1.0 if v.name == "gamma" else 0.0)).astype("float32"))


# ----------------------------------------------------------------------------- tests
def test_forward_matches_numpy_with_torch_padding():
    """Odd input (37 px): stride-2 convs and the max pool pad symmetrically, as torch does."""
    model = tiny()
    randomize_bn(model, np.random.default_rng(1))
    x = images(2, 37)
    out = forward(model, x, training=True)
    ref = np_resnet(model, x.astype(np.float64))
    for name, size in (("C2", 10), ("C3", 5), ("C4", 3), ("C5", 2)):
        assert tuple(out[name].shape) == (2, size, size, model.out_channels[name]), name
        np.testing.assert_allclose(to_numpy(out[name]), ref[name], rtol=2e-4, atol=2e-4, err_msg=name)


def test_strides_channels_and_classifier():
    model = tiny(include_top=True, num_classes=7)
    out = forward(model, images(1, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "C2": (1, 16, 16, 16),
        "C3": (1, 8, 8, 32),
        "C4": (1, 4, 4, 64),
        "C5": (1, 2, 2, 128),
        "logits": (1, 7),
    }
    assert model.out_channels == {"C2": 16, "C3": 32, "C4": 64, "C5": 128}
    assert model.conv1.kernel.shape == (7, 7, 3, 4)
    # BN constants of torchvision (eps 1e-5, torch momentum 0.1).
    assert model.bn1.epsilon == 1e-5 and model.bn1.momentum == 0.9


def test_resnet50_parameter_count():
    with numpy_init():
        top = kp.backbones.resnet50(include_top=True)
        bare = kp.backbones.resnet50()
    count = lambda m: sum(int(np.prod(v.shape)) for v in m.trainable_weights)  # noqa: E731
    assert count(top) == 25_557_032  # torchvision resnet50
    assert count(bare) == 23_508_032
    assert bare.stage_channels == (256, 512, 1024, 2048)
    assert [len(s) for s in bare.stages] == [3, 4, 6, 3]


def test_split_batch_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2, 5)).astype("float32") * 2 + 1
    layer = SplitBatchNorm(num_splits=3, epsilon=1e-5, momentum=0.9)
    layer.build(x.shape)
    layer.gamma.assign(rng.normal(size=5).astype("float32"))
    layer.beta.assign(rng.normal(size=5).astype("float32"))
    y = layer(x, training=True)
    np.testing.assert_allclose(to_numpy(y), np_bn_train(x.astype(np.float64), layer, groups=3), rtol=1e-4, atol=1e-4)
    g = x.astype(np.float64).reshape(3, 2, 3, 2, 5)
    mean = g.mean(axis=(1, 2, 3)).mean(0)
    var = g.var(axis=(1, 2, 3)).mean(0)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
    # Inference mode uses the moving statistics, whatever the splits.
    y = layer(x, training=False)
    ref = (x - to_numpy(layer.moving_mean)) / np.sqrt(to_numpy(layer.moving_variance) + 1e-5)
    np.testing.assert_allclose(to_numpy(y), ref * f64(layer.gamma) + f64(layer.beta), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 3"):
        layer(x[:4], training=True)


def test_split_bn_resnet_matches_numpy():
    model = tiny(bn_splits=2)
    x = images(4, 32, seed=3)
    out = forward(model, x, training=True)["C3"]
    g = x.astype(np.float64)
    ref = np.concatenate([np_resnet(model, g[:2])["C3"], np_resnet(model, g[2:])["C3"]])
    np.testing.assert_allclose(to_numpy(out), ref, rtol=2e-4, atol=2e-4)


def test_save_load_round_trip(tmp_path):
    model = tiny(bn_splits=2, include_top=True, num_classes=5)
    x = images(2, 32)
    for v in model.non_trainable_weights:  # BN statistics away from their init
        v.assign(np.random.default_rng(0).uniform(0.5, 2.0, size=v.shape).astype("float32"))
    path = str(tmp_path / "resnet.keras")
    model.save(path)
    with numpy_init():
        loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kp.backbones.ResNet)
    assert loaded.get_config() == model.get_config()
    for name in ("C5", "logits"):
        np.testing.assert_allclose(
            to_numpy(forward(loaded, x)[name]), to_numpy(forward(model, x)[name]), rtol=1e-5, atol=1e-5
        )


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="rank 3"):
        model(np.zeros((32, 32, 3), "float32"))
    with pytest.raises(ValueError, match="3 channels last"):
        model(np.zeros((1, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match="3 channels last"):
        model(np.zeros((1, 3, 32, 32), "float32"))
    with pytest.raises(ValueError, match="depths"):
        kp.backbones.ResNet(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="resnet_tiny"):
        kp.backbones.resnet("resnet18")
    with numpy_init():
        preset = kp.backbones.resnet("resnet_tiny", width=4)
    assert (preset.depths, preset.width, preset.name) == ((1, 1, 1, 1), 4, "resnet_tiny")


# ----------------------------------------------------------------------------- FPN
def np_nearest(x, size):
    rows = np.floor(np.arange(size[0]) * x.shape[1] / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * x.shape[2] / size[1]).astype(int)
    return x[:, rows][:, :, cols]


def test_nearest_resize_is_torch_nearest():
    x = np.arange(2 * 3 * 5 * 1, dtype="float32").reshape(2, 3, 5, 1)
    for size in ((6, 10), (5, 9), (3, 5)):
        np.testing.assert_array_equal(to_numpy(nearest_resize(x, size)), np_nearest(x, size))
    np.testing.assert_array_equal(to_numpy(nearest_resize(x, (6, 10))), x.repeat(2, 1).repeat(2, 2))


def test_fpn_shapes_and_numpy():
    backbone = tiny()
    with numpy_init(1):
        fpn = kp.backbones.FPN(out_channels=8)
    feats = forward(backbone, images(2, 50))  # C2..C5: 13, 7, 4, 2 (non-integer ratios)
    fpn.build({k: v.shape for k, v in feats.items()})
    out = forward(fpn, feats, training=True)
    assert sorted(out) == ["P2", "P3", "P4", "P5"]
    for i in range(2, 6):
        assert tuple(out[f"P{i}"].shape) == tuple(feats[f"C{i}"].shape[:3]) + (8,)
    # NumPy: lateral 1x1 + BN, top-down nearest sum, 3x3 (pad 1) + BN, no activation.
    c = {k: f64(v) for k, v in feats.items()}
    lat = [
        np_bn_train(np_conv(c[f"C{i + 2}"], f64(fpn.lateral_convs[i].kernel)), fpn.lateral_norms[i]) for i in range(4)
    ]
    for i in (3, 2, 1):
        lat[i - 1] = lat[i - 1] + np_nearest(lat[i], lat[i - 1].shape[1:3])
    for i in range(4):
        ref = np_bn_train(np_conv(lat[i], f64(fpn.output_convs[i].kernel), 1, 1), fpn.output_norms[i])
        np.testing.assert_allclose(to_numpy(out[f"P{i + 2}"]), ref, rtol=2e-4, atol=2e-4, err_msg=f"P{i + 2}")
    config = fpn.get_config()
    assert config["out_channels"] == 8 and config["use_norm"]
    plain = kp.backbones.FPN.from_config({**config, "use_norm": False, "name": "plain"})
    plain.build({k: v.shape for k, v in feats.items()})
    assert tuple(forward(plain, feats)["P2"].shape) == (2, 13, 13, 8)
    assert len(plain.lateral_convs[0].weights) == 2  # kernel + bias without norm
    with pytest.raises(ValueError, match="C3"):
        fpn({"C2": feats["C2"], "C4": feats["C4"], "C5": feats["C5"]})
