"""Image folders: every bad or unsupported file is counted and named."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from keras_pqcl.data import MultiCropConfig, load_source, pretrain_dataset


def _save(path, value, fmt=None):
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """3 good PNGs, a PNG and a JPEG with valid headers but corrupt data,
    a TIFF and a text file."""
    for i in range(3):
        _save(tmp_path / f"good{i}.png", 30 * i)
    _save(tmp_path / "ref.jpg", 5)
    png = (tmp_path / "good0.png").read_bytes()
    jpg = (tmp_path / "ref.jpg").read_bytes()
    os.remove(tmp_path / "ref.jpg")
    garbage = np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes()
    (tmp_path / "bad.png").write_bytes(png[:16] + garbage)  # signature + IHDR start
    (tmp_path / "bad.jpg").write_bytes(jpg[:20] + garbage)  # SOI + APP0 start
    _save(tmp_path / "scan.tif", 90, fmt="TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _load(path, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds, info = load_source(str(path), **kw)
    return ds, info, [str(w.message) for w in rec]


def test_decode_verification_names_every_bad_file(folder):
    ds, info, msgs = _load(folder, verify="decode")
    assert info.num_examples == 3 and info.verified
    assert info.num_skipped == 2
    assert sorted(os.path.basename(p) for p in info.skipped_files) == ["bad.jpg", "bad.png"]
    skipped = [m for m in msgs if "skipped" in m]
    assert len(skipped) == 1 and "skipped 2 of 5" in skipped[0]
    assert "bad.png" in skipped[0] and "bad.jpg" in skipped[0]
    # The TIFF is reported by name with the fix, and not read; the .txt is
    # not an image at all.
    tif = [m for m in msgs if "scan.tif" in m]
    assert len(tif) == 1 and "PNG or JPEG" in tif[0]
    assert [os.path.basename(p) for p in info.unsupported_files] == ["scan.tif"]
    assert not any("notes.txt" in m for m in msgs)
    assert len(list(ds)) == 3


def test_header_mode_counts_headers_and_drops_at_decode(folder):
    ds, info, msgs = _load(folder)  # verify="header"
    # Both corrupt files have valid signatures: counted, not verified ...
    assert info.num_examples == 5 and not info.verified
    assert info.skipped_files == () and info.num_skipped == 0
    assert not any("skipped" in m for m in msgs)
    assert any("scan.tif" in m for m in msgs)
    # ... and dropped when decoded.
    images = [im.numpy() for im, _ in ds]
    assert len(images) == 3 and all(im.shape == (10, 12, 3) for im in images)


def test_warning_lists_ten_names_and_counts_the_rest(tmp_path):
    _save(tmp_path / "ok.png", 1)
    for i in range(12):
        (tmp_path / f"junk{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    _, info, msgs = _load(tmp_path, verify="decode")
    assert info.num_examples == 1 and len(info.skipped_files) == 12
    (msg,) = [m for m in msgs if "skipped" in m]
    assert "skipped 12 of 13" in msg and "and 2 more" in msg
    assert "junk09.png" in msg and "junk10.png" not in msg


def test_unsupported_only_and_too_few_images(tmp_path):
    _save(tmp_path / "a.tif", 0, fmt="TIFF")
    (tmp_path / "b.HEIC").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"no image files.*a\.tif.*PNG or JPEG"):
        load_source(str(tmp_path))
    _save(tmp_path / "c.png", 0)
    # One usable image, batch 2: no full batch, the stream cannot have 0 steps.
    with (
        pytest.warns(UserWarning, match="a.tif"),
        pytest.raises(ValueError, match=rf"{tmp_path}.*1 examples.*batch_size=2"),
    ):
        pretrain_dataset(
            str(tmp_path),
            MultiCropConfig(global_size=16, local_size=8, n_local=0, use_keras_cv=False),
            batch_size=2,
            seed=0,
            epochs=1,
            photometric=False,
        )
