"""Test-wide settings: quiet TensorFlow logs, deterministic seeds, backend in the header."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every test builds new models, and JAX compiles each new model's programs again, which is
# most of a tiny JAX test's time. A compilation cache on disk, keyed by the program and the
# JAX version (so safe to keep between runs), turns each repeat into a file read; the
# subprocesses that tests start inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "keras_pqcl_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
