"""The model tier (``import keras_pqcl``, loading and running a saved backbone) needs only
Keras and NumPy: a JAX or PyTorch user must not need TensorFlow to run inference.

Each check runs in a fresh interpreter, because this test process already has TensorFlow
loaded (Keras' seeding in conftest imports it when it is installed).
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_pqcl as kp

BACKEND = keras.backend.backend()

pytestmark = pytest.mark.skipif(
    BACKEND not in ("jax", "torch"),
    reason="TensorFlow is the backend itself under KERAS_BACKEND=tensorflow",
)

# Makes TensorFlow look uninstalled: with None in sys.modules, ``import tensorflow`` raises
# ModuleNotFoundError and ``importlib.util.find_spec("tensorflow")`` returns None, as when it is
# missing. (A meta-path finder that raises would break torch, whose dynamo probes optional
# packages with find_spec and expects None.)
BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import sys

    sys.modules["tensorflow"] = None


    def tensorflow_modules():
        # TensorFlow modules loaded in spite of the block (the None placeholder is no module).
        return sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "tensorflow" and m is not None)
    """
)


def _run(code, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _features(backbone, size):
    out = backbone.forward_features(np.zeros((1, size, size, 3), "float32"))
    return {key: keras.ops.convert_to_numpy(out[key]) for key in ("cls", "patches")}


@pytest.mark.parametrize("backend", [BACKEND])
def test_load_and_run_backbones_without_tensorflow(backend, tmp_path):
    backbones = {
        "vit": (kp.backbones.vit("vit_tiny", patch_size=8, image_size=16, embed_dim=16, depth=1, num_heads=2), 16),
        "resnet": (kp.backbones.resnet("resnet_tiny", width=4), 32),
    }
    expected = {}
    for name, (backbone, size) in backbones.items():
        expected[name] = _features(backbone, size)  # also builds the model before saving
        backbone.save(str(tmp_path / f"{name}.keras"))

    code = BLOCK_TENSORFLOW + textwrap.dedent(
        """
        import keras
        import numpy as np

        import keras_pqcl as kp

        assert keras.backend.backend() == BACKEND, keras.backend.backend()
        outputs = {}
        for name, size in SIZES.items():
            zeros = np.zeros((1, size, size, 3), "float32")
            for loader in ("load_backbone", "load_model"):
                if loader == "load_backbone":
                    backbone = kp.load_backbone(f"{name}.keras")
                else:
                    backbone = keras.saving.load_model(f"{name}.keras")
                out = backbone.forward_features(zeros)
                for key in ("cls", "patches"):
                    outputs[f"{name}/{loader}/{key}"] = keras.ops.convert_to_numpy(out[key])
        np.savez("outputs.npz", **outputs)
        assert not tensorflow_modules(), f"tensorflow was imported: {tensorflow_modules()}"
        """
    ).replace("BACKEND", repr(backend)).replace("SIZES", repr({n: s for n, (_, s) in backbones.items()}))
    _run(code, tmp_path)

    with np.load(tmp_path / "outputs.npz") as outputs:
        for name in backbones:
            for loader in ("load_backbone", "load_model"):
                for key in ("cls", "patches"):
                    np.testing.assert_allclose(
                        outputs[f"{name}/{loader}/{key}"],
                        expected[name][key],
                        atol=1e-5,
                        err_msg=f"{name} {key} after {loader}",
                    )


@pytest.mark.parametrize("backend", [BACKEND])
def test_import_does_not_load_tensorflow(backend, tmp_path):
    code = textwrap.dedent(
        """
        import sys

        import keras_pqcl as kp

        assert "tensorflow" not in sys.modules, "import keras_pqcl imported tensorflow"
        # Public names of the model tier resolve without TensorFlow too.
        assert kp.callbacks.KNNMonitor and kp.io.load_torch_checkpoint and kp.pretrain
        assert "data" in dir(kp) and "eval" in dir(kp)
        assert "tensorflow" not in sys.modules, "a model-tier name imported tensorflow"

        # The data and eval tiers load on first access.
        assert callable(kp.data.pretrain_dataset)
        from keras_pqcl import data, eval

        assert data is kp.data and callable(eval.extract_features) and eval is kp.eval
        """
    )
    _run(code, tmp_path)
