"""User mistakes end in one line naming the file or value and the fix, never a traceback."""

import io
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

import keras_pqcl as kp
from keras_pqcl import cli


@pytest.fixture
def error(tmp_path, capsys):
    """``keras-pqcl eval ARGV`` must exit 2 with a one-line message; returns it."""

    def run(*argv):
        assert cli.main(["eval", *argv, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("keras-pqcl: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return run


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_unreadable_attention_images(weights, tmp_path, error):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg_bytes()[:300])  # valid header, data cut off: PIL fails in convert
    message = error("attention", "--weights", weights, "--image", str(truncated))
    assert "truncated.jpg" in message and "corrupt or truncated" in message and "re-export" in message

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2)
    assert "garbage.jpg" in error("attention", "--weights", weights, "--image", str(garbage))

    folder = tmp_path / "photos"
    folder.mkdir()
    message = error("attention", "--weights", weights, "--image", str(folder))
    assert "photos" in message and "is a directory" in message

    cube = str(tmp_path / "cube.npy")
    np.save(cube, np.zeros((2, 16, 16, 3), np.uint8))
    message = error("attention", "--weights", weights, "--image", cube)
    assert "cube.npy" in message and "(2, 16, 16, 3)" in message and "(height, width, 3)" in message

    scaled = str(tmp_path / "scaled.npy")
    np.save(scaled, np.full((16, 16, 3), 200.0, np.float32))
    assert "not in [0, 1]" in error("attention", "--weights", weights, "--image", scaled)


def test_grey_npy_image_is_accepted(weights, tmp_path):
    grey = str(tmp_path / "grey.npy")
    np.save(grey, np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8))
    assert cli._read_image(grey).shape == (16, 16, 3)
    assert (
        cli.main(["eval", "attention", "--weights", weights, "--image", grey, "--output", str(tmp_path / "out")]) == 0
    )


def test_damaged_weights_files(weights, tmp_path, error):
    truncated = tmp_path / "truncated.keras"
    with open(weights, "rb") as f:
        truncated.write_bytes(f.read()[:300])
    message = error("knn", "--weights", str(truncated))
    assert "truncated.keras" in message and "not a zip archive" in message and "File not found" not in message

    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(512))
    assert "not a .keras file" in error("knn", "--weights", str(noise))

    assert "is a directory" in error("knn", "--weights", str(tmp_path))

    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("model.weights.h5", b"")
    assert "without config.json" in error("knn", "--weights", str(no_config))

    dense = str(tmp_path / "dense.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(dense)
    message = error("knn", "--weights", dense)
    assert "Sequential" in message and "neither a ViT backbone" in message


def test_load_backbone_is_public(weights, tmp_path):
    backbone = kp.load_backbone(weights)
    assert type(backbone).__name__ == "VisionTransformer" and backbone.patch_size == 8
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        kp.load_backbone(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="use="):
        kp.load_backbone(weights, use="ema")


def test_eval_on_the_training_folder_warns(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(4):
        folder = tmp_path / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    same = str(tmp_path / "train" / ".." / "train")  # another spelling of the same folder
    argv = [
        "eval",
        "knn",
        "--weights",
        weights,
        "--data",
        str(tmp_path / "train"),
        "--test-data",
        same,
        "--k",
        "2",
        "--output",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "memorisation, not generalisation" in warnings[0]

    # Default synthetic splits use different seeds, and tfds splits differ by name: no warning.
    args = cli._parser().parse_args(["eval", "knn", "--weights", weights])
    cli._warn_if_same_split(args, cli._test_spec(args))
    args = cli._parser().parse_args(["eval", "knn", "--weights", weights, "--data", "tfds:beans"])
    cli._warn_if_same_split(args, cli._test_spec(args))
    assert "warning" not in capsys.readouterr().err
    args = cli._parser().parse_args(
        ["eval", "knn", "--weights", weights, "--data", "tfds:beans", "--test-split", "train"]
    )
    cli._warn_if_same_split(args, cli._test_spec(args))
    assert "memorisation" in capsys.readouterr().err


def test_fit_before_compile_says_compile_first():
    backbone = kp.backbones.vit_tiny(8, depth=1, embed_dim=32, num_heads=2, image_size=16)
    model = kp.models.DINO(backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    crops = {"global_crops": np.zeros((4, 2, 16, 16, 3), np.float32)}
    with pytest.raises(ValueError, match="Compile the model first"):
        model.fit(crops, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="Compile the model first"):
        model.fit(crops, verbose=0)  # even where the epoch length is unknown too
