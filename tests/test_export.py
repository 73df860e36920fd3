"""``export_backbone`` / ``keras-pqcl export``: every format the backend supports gives the
backbone's CLS and patch tokens to 1e-4 (against a NumPy forward and the Keras model), at two
image sizes when the size is free; the other pairs and bad inputs fail with one clear line."""

import os

import keras
import numpy as np
import pytest

from keras_pqcl import cli
from keras_pqcl.backbones import VisionTransformer
from keras_pqcl.io.export import FORMATS, SUPPORT, _backbone, export_backbone

from tests import helpers as H

pytestmark = [
    H.IGNORE_NUMPY2_COPY_WARNING,
    # ai_edge_litert is not installed; TensorFlow's own interpreter still runs the files.
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
    # Keras' tf2onnx patch probes np.object.
    pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning"),
    # torch.onnx's exporter calls its own deprecated pytree API.
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
]
BACKEND = keras.backend.backend()
SUPPORTED = [f for f in FORMATS if SUPPORT[(BACKEND, f)] is None]
UNSUPPORTED = [f for f in FORMATS if SUPPORT[(BACKEND, f)] is not None]
PATCH, SIZE = 8, 16  # the table is made for a 2 x 2 grid
TOL = dict(rtol=1e-4, atol=1e-4)
SUFFIX = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite"}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = VisionTransformer(patch_size=PATCH, embed_dim=16, depth=2, num_heads=2, image_size=SIZE, name="tiny_vit")
    H.randomize(model, np.random.default_rng(0), scale=0.2)
    path = str(tmp_path_factory.mktemp("export") / "teacher_backbone.keras")
    model.save(path)
    return path, model


def numpy_tokens(model, images):
    """Reference ViT forward: patch projection, CLS, DINO-resampled positions, blocks, LayerNorm."""
    b, h, w, _ = images.shape
    p, dim, g = model.patch_size, model.embed_dim, model.grid_size
    kernel = H.f64(model.patch_embed.proj.kernel).reshape(p * p * 3, dim)
    x = H.patchify(images.astype(np.float64), p) @ kernel + H.f64(model.patch_embed.proj.bias)
    x = np.concatenate([np.broadcast_to(H.f64(model.cls_token), (b, 1, dim)), x], axis=1)
    pos = H.f64(model.pos_embed)[0]
    x = x + np.concatenate([pos[:1], H.interpolate_pos(pos[1:], (g, g), (h // p, w // p))])[None]
    for blk in model.blocks:
        x = H.block(x, H.block_weights(blk))[0]
    x = H.layer_norm(x, H.f64(model.norm.gamma), H.f64(model.norm.beta), 1e-6)
    return x[:, 0], x[:, 1:]


def run_exported(format, path, images):
    """``{"cls", "patches"}`` from the exported artifact, read by its own runtime."""
    if format == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # held: its variables die with it
        out = loaded.serve(tf.constant(images))
        return {k: np.asarray(v) for k, v in out.items()}
    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (feed,) = session.get_inputs()
        names = [o.name for o in session.get_outputs()]
        return dict(zip(_output_keys(names), session.run(None, {feed.name: images})))
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    return {k: np.asarray(v) for k, v in runner(images=images).items()}


def _output_keys(names):
    # tf2onnx names outputs after the tensors ("cls", "patches" or "Identity:0", ...);
    # both orders follow the serving function's dict, whose keys are sorted.
    assert len(names) == 2, names
    return ["cls", "patches"]


def check(format, path, model, height, width, batch=2):
    images = np.random.default_rng(height + width).normal(size=(batch, height, width, 3)).astype("float32")
    got = run_exported(format, path, images)
    cls, patches = numpy_tokens(model, images)
    keras_out = model(images)
    np.testing.assert_allclose(got["cls"], cls, **TOL)
    np.testing.assert_allclose(got["patches"], patches, **TOL)
    np.testing.assert_allclose(got["cls"], H.to_numpy(keras_out["cls"]), **TOL)
    np.testing.assert_allclose(got["patches"], H.to_numpy(keras_out["patches"]), **TOL)


def needs_runtime(format):
    """ONNX needs the test extra (pip install -e ".[test]"): onnxruntime, and the exporter."""
    if format == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip({"tensorflow": "tf2onnx", "torch": "onnxscript"}.get(BACKEND, "onnx"))


@pytest.mark.parametrize("format", SUPPORTED)
def test_export_round_trip_dynamic_size(format, backbone_file, tmp_path):
    needs_runtime(format)
    path, model = backbone_file
    out = str(tmp_path / f"model{SUFFIX[format]}")
    assert export_backbone(path, out, format=format, dynamic_size=True) == out
    check(format, out, model, SIZE, SIZE)  # the table's own grid: no resampling
    check(format, out, model, 32, 24, batch=3)  # resampled in the exported graph


@pytest.mark.parametrize("format", SUPPORTED)
def test_export_fixed_size_via_cli(format, backbone_file, tmp_path):
    needs_runtime(format)
    path, model = backbone_file
    out = str(tmp_path / f"model{SUFFIX[format]}")
    assert cli.main(["export", "--weights", path, "--format", format, "--image-size", "24", "--output", out]) == 0
    check(format, out, model, 24, 24)


@pytest.mark.parametrize("format", UNSUPPORTED)
def test_unsupported_pair_is_one_clear_error(format, backbone_file, tmp_path, capsys):
    path, _ = backbone_file
    with pytest.raises(ValueError, match=f"cannot export {format} on the {BACKEND} backend: .*--backend"):
        export_backbone(path, str(tmp_path / "x"), format=format)
    assert cli.main(["export", "--weights", path, "--format", format, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot export {format} on the {BACKEND} backend" in err


def test_cli_bad_inputs_are_one_line(backbone_file, tmp_path, capsys):
    path, _ = backbone_file
    fmt = SUPPORTED[0] if SUPPORTED else "saved_model"
    other = str(tmp_path / "sequential.keras")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(other)
    not_zip = str(tmp_path / "notes.keras")
    with open(not_zip, "w") as f:
        f.write("not a model")

    def error(*argv, needle):
        code = cli.main(["export", "--output", str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("keras-pqcl: error:"), err
        assert needle in err, err

    error("--weights", str(tmp_path / "missing.keras"), "--format", fmt, needle="not found")
    error("--weights", other, "--format", fmt, needle="neither a ViT backbone")
    error("--weights", not_zip, "--format", fmt, needle="not a zip archive")
    error("--weights", path, "--format", "tflite", needle="not an export format")
    error("--weights", path, "--format", fmt, "--image-size", "20", needle="not a positive multiple of the patch")
    error("--weights", path, "--format", fmt, "--image-size", "16", "--dynamic-size", needle="not both")
    assert not os.path.exists(tmp_path / "out")


def test_whole_checkpoint_needs_use(tmp_path, capsys):
    import keras_pqcl as kp

    student = kp.backbones.vit_tiny(PATCH, depth=1, embed_dim=16, num_heads=2, image_size=SIZE)
    model = kp.models.DINO(student, out_dim=8, hidden_dim=8, bottleneck_dim=8)
    path = str(tmp_path / "checkpoint.keras")
    model.save(path)
    with pytest.raises(ValueError, match="whole pre-training checkpoint .*use='teacher'"):
        export_backbone(path, str(tmp_path / "x"), format=SUPPORTED[0] if SUPPORTED else "saved_model")
    code = cli.main(
        [
            "export",
            "--weights",
            path,
            "--format",
            SUPPORTED[0] if SUPPORTED else "saved_model",
            "--output",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--use teacher" in err, err
    # With use, the export reads that backbone (the round trips above cover the writing).
    for use in ("teacher", "student"):
        chosen = _backbone(path, use)
        expected = getattr(model, f"{use}_backbone")
        for got, want in zip(chosen.weights, expected.weights):
            np.testing.assert_array_equal(H.to_numpy(got), H.to_numpy(want))
