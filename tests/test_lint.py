"""The repository follows its one linter and formatter config (``ruff.toml``)."""

import os
import shutil
import subprocess

import keras
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the same files on every backend: once per CI loop")
def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "--no-cache", REPO], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the same files on every backend: once per CI loop")
def test_ruff_format_is_applied():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "format", "--check", "--no-cache", REPO], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "run `ruff format .`: " + proc.stdout[-4000:] + proc.stderr[-2000:]
