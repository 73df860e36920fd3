"""`keras-pqcl finetune segment` end to end on a tiny saved backbone, and its input errors."""

import csv
import json
import os

import numpy as np
from PIL import Image

from keras_pqcl import cli


def test_finetune_segment_writes_log_summary_and_predictions(weights, tmp_path):
    out = str(tmp_path / "seg")
    argv = [
        "finetune",
        "segment",
        "--weights",
        weights,
        "--data",
        "synthetic_scenes:16:16",
        "--epochs",
        "2",
        "--decoder",
        "fpn",
        "--channels",
        "8",
        "--lr",
        "1e-3",
        "--output",
        out,
        "--quiet",
    ]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_classes"] == 11 and summary["num_train"] == 16 and summary["num_val"] == 4
    assert set(summary["val"]) == {"loss", "mIoU", "mAcc", "aAcc"} and summary["channels"] == 8
    with open(os.path.join(out, "log.csv")) as f:
        assert len(list(csv.DictReader(f))) == 2
    with Image.open(os.path.join(out, "predictions.png")) as png:
        assert png.size == (3 * 16, 4 * 16)  # image | truth | prediction, one row per val image
    assert os.path.exists(os.path.join(out, "segmenter.keras"))


def test_finetune_segment_input_errors(weights, tmp_path, capsys):
    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "ann")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    base = ["finetune", "segment", "--weights", weights, "--output", str(tmp_path / "o")]
    assert cli.main(base + ["--data", str(tmp_path / "img"), "--masks", str(tmp_path / "ann")]) == 2
    assert "--val-data (with --val-masks) is required" in capsys.readouterr().err
    folder = [
        "--data",
        str(tmp_path / "img"),
        "--masks",
        str(tmp_path / "ann"),
        "--val-data",
        str(tmp_path / "img"),
        "--val-masks",
        str(tmp_path / "ann"),
    ]
    assert cli.main(base + folder) == 2
    assert "no image files in the masks folder" in capsys.readouterr().err
    mask = np.zeros((16, 16), np.uint8)
    mask[3, 3] = 9
    Image.fromarray(mask).save(tmp_path / "ann" / "a.png")
    assert cli.main(base + folder + ["--num-classes", "4"]) == 2
    err = capsys.readouterr().err
    assert "ann/a.png" in err and "holds class id 9" in err
