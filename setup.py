"""keras_pqcl: dense self-supervised pre-training (DINO, iBOT, PQCL, ...) for Keras 3."""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "keras_pqcl", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__")


def _packages():
    found = []
    for root, dirs, files in os.walk(os.path.join(HERE, "keras_pqcl")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.append(os.path.relpath(root, HERE).replace(os.sep, "."))
    return found + ["keras_pqcl.recipes"]


# TensorFlow is needed on every backend: the data pipeline is tf.data. The CPU wheel is the
# default; GPU users install `tensorflow[and-cuda]` (extra "tf-gpu") instead.
TF_CPU = ["tensorflow-cpu>=2.21,<2.22", "tensorboard>=2.21,<2.22"]
EXTRAS = {
    "tensorflow": TF_CPU,
    "tf-gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    "jax": ["jax[cpu]>=0.10.2,<0.11"],
    # 2.13.0 is the CPU wheel the development machines carry; an unpinned torch pulls a
    # multi-GB CUDA build.
    "torch": ["torch==2.13.0"],
    "cv": ["keras-cv==0.9.0"],
    # ONNX export checks: tf2onnx (TensorFlow backend), onnx + onnxscript (torch.onnx's dynamo
    # exporter), onnxruntime to run the files. JAX's ONNX path (jax2onnx) is not supported: it
    # pulls flax, orbax and tensorstore. safetensors: the Hugging Face DINOv2 importer's file test.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "scipy",
        "ruff>=0.6",
        "onnx>=1.23,<1.24",
        "onnxruntime>=1.32,<1.33",
        "onnxscript>=0.7,<0.8",
        "tf2onnx>=1.17,<1.18",
        "safetensors",
    ],
}
EXTRAS["all"] = sorted(set(TF_CPU + EXTRAS["jax"] + EXTRAS["torch"] + EXTRAS["cv"]))

setup(
    name="keras-pqcl",
    version=_version(),
    description="Dense self-supervised pre-training of vision models (DINO, iBOT, PQCL, ADCLR) for Keras 3",
    long_description=(
        open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else ""
    ),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"keras_pqcl.recipes": "recipes"},
    install_requires=["keras>=3.15,<3.16", "numpy", "matplotlib"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["keras-pqcl=keras_pqcl.cli:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
