"""`keras-pqcl eval` end to end on a tiny saved backbone, and its input errors."""

import json
import os

import numpy as np
from PIL import Image

from keras_pqcl import cli


def _record(out):
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def test_eval_knn_on_held_out_synthetic_splits(weights, tmp_path, capsys):
    out = str(tmp_path / "knn")
    argv = ["eval", "knn", "--weights", weights, "--data", "synthetic_scenes:24:16", "--k", "5", "--output", out]
    assert cli.main(argv) == 0
    record = _record(out)
    assert record["train"] == "synthetic_scenes:24:16 (seed 1)"
    assert record["test"] == "synthetic_scenes:6:16 (seed 2)"  # a quarter of --data, other seed
    assert record["results"]["k"] == 5 and record["results"]["num_test"] == 6
    assert 0.0 <= record["results"]["top1"] <= record["results"]["top5"] <= 100.0
    printed = capsys.readouterr().out
    assert "top1" in printed and "Wrote" in printed


def test_eval_linear_and_dense_on_folders(weights, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
        os.makedirs(tmp_path / f"{split}_images")
        os.makedirs(tmp_path / f"{split}_masks")
        for i in range(n):
            pixels = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels[0]).save(tmp_path / split / "ab"[i % 2] / f"{i}.png")
            Image.fromarray(pixels[1]).save(tmp_path / f"{split}_images" / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 3, (16, 16), dtype=np.uint8)).save(tmp_path / f"{split}_masks" / f"{i}.png")

    out = str(tmp_path / "linear")
    argv = [
        "eval",
        "linear",
        "--weights",
        weights,
        "--data",
        str(tmp_path / "train"),
        "--test-data",
        str(tmp_path / "test"),
        "--epochs",
        "2",
        "--lr",
        "1e-2,1e-1",
        "--output",
        out,
        "--quiet",
    ]
    assert cli.main(argv) == 0
    results = _record(out)["results"]
    assert results["num_train"] == 6 and results["num_classes"] == 2 and len(results["history"]["top1"]) == 2
    assert results["lr"] in (1e-2, 1e-1)  # the swept rate that won

    out = str(tmp_path / "dense")
    argv = [
        "eval",
        "dense",
        "--weights",
        weights,
        "--data",
        str(tmp_path / "train_images"),
        "--masks",
        str(tmp_path / "train_masks"),
        "--test-data",
        str(tmp_path / "test_images"),
        "--test-masks",
        str(tmp_path / "test_masks"),
        "--epochs",
        "1",
        "--output",
        out,
        "--quiet",
    ]
    assert cli.main(argv) == 0
    results = _record(out)["results"]
    assert results["num_classes"] == 3 and results["grid"] == [2, 2] and 0.0 <= results["miou"] <= 100.0


def test_eval_attention_writes_pngs(weights, tmp_path):
    out = str(tmp_path / "attention")
    # Default image: a held-out synthetic_scenes image of 64 px, kept at its size (8 x 8 patches).
    assert cli.main(["eval", "attention", "--weights", weights, "--threshold", "0.6", "--output", out]) == 0
    record = _record(out)
    assert record["results"]["heads"] == 2 and record["results"]["height"] == 64
    with Image.open(os.path.join(out, "attention.png")) as png:
        assert png.size == (3 * 64, 64)
    with Image.open(os.path.join(out, "attention_threshold.png")) as png:
        assert png.size == (3 * 64, 64)
    with Image.open(os.path.join(out, "pca.png")) as png:
        assert png.size == (2 * 64, 64)

    # A user image file (RGBA is converted, as the reference does) resized with --image-size.
    image = str(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 4), dtype=np.uint8)).save(image)
    out = str(tmp_path / "photo")
    assert (
        cli.main(["eval", "attention", "--weights", weights, "--image", image, "--image-size", "24", "--output", out])
        == 0
    )
    with Image.open(os.path.join(out, "attention.png")) as png:
        assert png.size == (3 * 24, 24)


def test_eval_input_errors_are_clear(weights, tmp_path, capsys):
    def error(*argv):
        assert cli.main(["eval", *argv, "--output", str(tmp_path / "o")]) == 2
        return capsys.readouterr().err

    assert "weights file not found" in error("knn", "--weights", str(tmp_path / "missing.keras"))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    assert "could not load" in error("knn", "--weights", str(broken))

    four = str(tmp_path / "rgba.npy")
    np.save(four, np.zeros((16, 16, 4), np.uint8))
    message = error("attention", "--weights", weights, "--image", four)
    assert "3 channels" in message and "alpha" in message and "Traceback" not in message

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "cat.jpg")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "dog.png")
    message = error(
        "dense",
        "--weights",
        weights,
        "--data",
        str(images),
        "--masks",
        str(masks),
        "--test-data",
        str(images),
        "--test-masks",
        str(masks),
    )
    assert "do not pair up" in message and "cat" in message and "dog" in message
    assert "--masks is required" in error("dense", "--weights", weights, "--data", str(images))
    assert "one --lr" in error(
        "dense", "--weights", weights, "--data", str(images), "--masks", str(masks), "--lr", "1e-2,1e-1"
    )
    assert "--test-data is required" in error("knn", "--weights", weights, "--data", str(images))
    unlabelled = error("knn", "--weights", weights, "--data", str(images), "--test-data", str(images))
    assert "no class sub-folders" in unlabelled
