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
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    with Image.open(os.path.join(out, "predictions.png")) as png:
        assert png.size == (3 * 16, 4 * 16)  # image | truth | prediction, one row per val image
    assert os.path.exists(os.path.join(out, "segmenter.keras"))
    assert os.path.exists(os.path.join(out, "loss.png")) and "val_mIoU" in rows[0]
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert checkpoints == ["checkpoint-e00001-s0000000.keras", "checkpoint-e00002-s0000000.keras"]


def test_finetune_segment_resume_and_its_errors(weights, tmp_path, capsys):
    out = str(tmp_path / "seg")
    argv = ["finetune", "segment", "--weights", weights, "--data", "synthetic_scenes:8:16", "--output", out]
    argv += ["--epochs", "1", "--decoder", "linear", "--batch-size", "4", "--quiet"]
    assert cli.main(argv + ["--resume"]) == 2  # nothing to resume yet
    assert "holds no checkpoint to continue" in capsys.readouterr().err
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 2  # never over another run by accident
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert cli.main(argv + ["--resume", "--lr", "2e-3"]) == 2
    assert "--resume cannot change lr (was 0.0001, now 0.002)" in capsys.readouterr().err
    # A finished run resumed: its checkpoint holds every epoch, so only the final files are rewritten.
    assert cli.main(argv + ["--resume"]) == 0
    assert "holds all 1 epochs" in capsys.readouterr().out
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["resumed_from"].endswith("checkpoint-e00001-s0000000.keras")
    with open(os.path.join(out, "checkpoints", "checkpoint-e00001-s0000000.keras"), "wb") as f:
        f.write(b"not a checkpoint")
    assert cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 1 checkpoints" in err[0] and "not a zip archive" in err[0]
    assert cli.main(argv + ["--overwrite"]) == 0  # replaces the broken run


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
