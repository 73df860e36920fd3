"""Test-wide settings: quiet TensorFlow logs, deterministic seeds, backend in the header."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny saved ViT backbone (``teacher_backbone.keras``), for the CLI tests."""
    import keras_pqcl as kp

    keras.utils.set_random_seed(3)
    backbone = kp.backbones.vit_tiny(8, depth=1, embed_dim=32, num_heads=2, image_size=16)
    path = str(tmp_path_factory.mktemp("run") / "teacher_backbone.keras")
    backbone.save(path)
    return path
