"""Image sources → ``tf.data.Dataset`` of ``(image uint8 [H, W, 3], label int32)``.

Accepted ``data`` values for :func:`load_source`:

* ``"synthetic_scenes"`` or ``"synthetic_scenes:N"`` (or
  ``"synthetic_scenes:N:S"``): the embedded procedural dataset
  (:mod:`keras_pqcl.data.synthetic`), default N = 2048 images of S = 64 px,
  generated with seed 0 (the dataset itself does not change with the
  pipeline seed).
* a directory path: every ``.jpg .jpeg .png .webp .bmp .gif`` file below it
  (recursive, extensions case-insensitive). Labels come from the first-level
  sub-folder names (sorted → 0..K-1) when there are such folders; images
  directly in the root get -1. Files whose header is not a known image
  format are skipped with ONE warning giving their count.
* numpy arrays: ``images`` or ``(images,)`` or ``(images, labels)`` or a dict
  with keys ``images``/``image`` and optionally ``labels``/``label``.
  Images are uint8 ``[N, H, W, 3]`` or float in ``[0, 1]``; grayscale
  ``[N, H, W]`` / ``[N, H, W, 1]`` is expanded to 3 channels.
* ``"tfds:NAME"`` or ``"tfds:NAME/CONFIG"``: a TensorFlow Datasets dataset
  that is already prepared on disk (no download; ``data_dir`` or the
  ``TFDS_DATA_DIR`` environment variable says where).
"""

import dataclasses
import functools
import os
import warnings
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from keras_pqcl.data import synthetic as synthetic_lib

__all__ = [
    "IMAGE_EXTENSIONS",
    "SourceInfo",
    "load_source",
    "list_image_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

SYNTHETIC_DEFAULT_NUM = 2048
SYNTHETIC_DEFAULT_SIZE = 64

# Arrays above this size are not captured into the tf.data graph (protobuf
# limit is 2 GiB); they are read through tf.numpy_function instead.
_MAX_IN_GRAPH_BYTES = 1 << 30


@dataclasses.dataclass
class SourceInfo:
    """Metadata of a source.

    Attributes:
        name: short description (e.g. ``"synthetic_scenes:2048"``, a path).
        num_examples: number of examples, or None when unknown. For folders
            it counts files that passed the header check (a file corrupt
            past its header is still dropped at decode time).
        class_names: tuple of class names (label k = class_names[k]) or None.
        num_skipped: files skipped before decoding (folders only).
    """

    name: str
    num_examples: Optional[int]
    class_names: Optional[Tuple[str, ...]]
    num_skipped: int = 0


# ---------------------------------------------------------------------------
# numpy
# ---------------------------------------------------------------------------
def _as_uint8_rgb(images):
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W] grayscale
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            "images must be an array [N, H, W, 3] (or grayscale [N, H, W] / "
            f"[N, H, W, 1]); got shape {images.shape}."
        )
    channels = images.shape[-1]
    if channels not in (1, 3):
        hint = " Drop the alpha channel with images[..., :3]." if channels == 4 else ""
        raise ValueError(
            f"images must have 3 channels (RGB) or 1 (grayscale); got shape "
            f"{images.shape} with {channels} channels.{hint}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0).")
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0 + 1e-6:
            raise ValueError(
                "float images must lie in [0, 1]; got values in "
                f"[{lo:g}, {hi:g}]. Divide by 255 or pass uint8 images."
            )
        images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(images.dtype, np.integer):
        lo, hi = int(np.min(images)), int(np.max(images))
        if lo < 0 or hi > 255:
            raise ValueError(
                f"integer images must lie in [0, 255]; got [{lo}, {hi}] "
                f"(dtype {images.dtype})."
            )
        images = images.astype(np.uint8)
    else:
        raise ValueError(
            f"images must be uint8 or float in [0, 1]; got dtype {images.dtype}."
        )
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _numpy_dataset(images, labels, shuffle, seed):
    """Index-based dataset: shuffling indices is cheap, images are gathered."""
    n = images.shape[0]
    index = tf.data.Dataset.range(n)
    if shuffle:
        index = index.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if images.nbytes <= _MAX_IN_GRAPH_BYTES:
        images_t = tf.constant(images)
        labels_t = tf.constant(labels)

        def fetch(i):
            return tf.gather(images_t, i), tf.gather(labels_t, i)
    else:
        def _np_fetch(i):
            return images[i], labels[i]

        def fetch(i):
            img, lab = tf.numpy_function(_np_fetch, [i], [tf.uint8, tf.int32])
            img.set_shape(images.shape[1:])
            lab.set_shape([])
            return img, lab

    return index.map(fetch, num_parallel_calls=tf.data.AUTOTUNE)


def _from_numpy(data, shuffle, seed, name="numpy"):
    labels = None
    if isinstance(data, dict):
        keys = set(data)
        img_key = "images" if "images" in keys else "image" if "image" in keys else None
        if img_key is None:
            raise ValueError(
                "a dict source needs an 'images' (or 'image') entry; got keys "
                f"{sorted(keys)}."
            )
        images = data[img_key]
        labels = data.get("labels", data.get("label"))
    elif isinstance(data, (tuple, list)):
        if not 1 <= len(data) <= 2:
            raise ValueError(
                "a tuple source must be (images,) or (images, labels); got "
                f"{len(data)} entries."
            )
        images = data[0]
        labels = data[1] if len(data) == 2 else None
    else:
        images = data
    images = _as_uint8_rgb(images)
    n = images.shape[0]
    if labels is None:
        labels = np.full([n], -1, np.int32)
    else:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (n,):
            raise ValueError(
                f"labels must have shape [N] = [{n}]; got {labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers; got dtype {labels.dtype}."
            )
        labels = labels.astype(np.int32)
    ds = _numpy_dataset(images, labels, shuffle, seed)
    info = SourceInfo(name=name, num_examples=n, class_names=None)
    return ds, info


# ---------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _cached_synthetic(num, size):
    out = synthetic_lib.synthetic_scenes(num, image_size=size, seed=0)
    return out["images"], out["labels"]


def _parse_synthetic(spec):
    parts = spec.split(":")
    try:
        num = int(parts[1]) if len(parts) > 1 else SYNTHETIC_DEFAULT_NUM
        size = int(parts[2]) if len(parts) > 2 else SYNTHETIC_DEFAULT_SIZE
        if len(parts) > 3:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"cannot parse {spec!r}; use 'synthetic_scenes', "
            "'synthetic_scenes:N' (N images) or 'synthetic_scenes:N:S' "
            "(N images of S x S pixels)."
        ) from None
    if num < 1:
        raise ValueError(f"{spec!r}: the number of images must be >= 1.")
    return num, size


def _from_synthetic(spec, shuffle, seed):
    num, size = _parse_synthetic(spec)
    images, labels = _cached_synthetic(num, size)
    ds = _numpy_dataset(images, labels, shuffle, seed)
    info = SourceInfo(
        name=f"synthetic_scenes:{num}:{size}",
        num_examples=num,
        class_names=tuple(synthetic_lib.SYNTHETIC_CLASS_NAMES),
    )
    return ds, info


# ---------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------
def _looks_like_image(path):
    """Magic-byte check for the formats ``tf.io.decode_image`` reads."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return (
        head[:3] == b"\xff\xd8\xff"  # JPEG
        or head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:6] in (b"GIF87a", b"GIF89a")
        or head[:2] == b"BM"
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


def list_image_files(root):
    """Lists image files below ``root`` with labels from sub-folder names.

    Returns:
        ``(paths, labels, class_names)``: sorted list of str, int32 numpy
        ``[n]`` (-1 for images directly in ``root``), tuple of names (empty
        when there are no first-level sub-folders with images).
    """
    paths = []
    seen = set()
    # Follow symlinked folders (common for dataset layouts) but never visit
    # the same real folder twice, so a link loop cannot recurse forever.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for fname in sorted(filenames):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(dirpath, fname))
    top = []
    for p in paths:
        rel = os.path.relpath(p, root)
        parts = rel.split(os.sep)
        top.append(parts[0] if len(parts) > 1 else None)
    class_names = tuple(sorted({t for t in top if t is not None}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[t] if t is not None else -1 for t in top], np.int32)
    return paths, labels, class_names


def _decode_file(path, label):
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=3, expand_animations=False,
                               dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image, label


def _from_folder(root, shuffle, seed, verify):
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder not found: {root!r}")
    if not os.path.isdir(root):
        raise ValueError(
            f"{root!r} is a file; pass a folder of images, 'synthetic_scenes', "
            "'tfds:NAME' or numpy arrays."
        )
    paths, labels, class_names = list_image_files(root)
    if not paths:
        raise ValueError(
            f"no image files found in folder {root!r} (searched recursively "
            f"for extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    total = len(paths)
    if verify in ("header", "decode"):
        keep = [_looks_like_image(p) for p in paths]
        if verify == "decode":
            keep = [k and _decodes(p) for k, p in zip(keep, paths)]
        bad = [p for p, k in zip(paths, keep) if not k]
        paths = [p for p, k in zip(paths, keep) if k]
        labels = labels[np.asarray(keep, bool)]
        if bad:
            warnings.warn(
                f"skipped {len(bad)} of {total} image files in {root!r} that "
                f"are unreadable or corrupt (first: {bad[0]!r}).",
                stacklevel=3,
            )
        if not paths:
            raise ValueError(
                f"none of the {total} image files in folder {root!r} could be "
                f"read (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})."
            )
    elif verify != "none":
        raise ValueError(
            f"verify must be 'header', 'decode' or 'none'; got {verify!r}."
        )
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths), tf.constant(labels, tf.int32))
    )
    if shuffle:
        # Shuffle file names (cheap) rather than decoded images.
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)
    # Safety net for files whose header is fine but whose data is not (e.g.
    # truncated PNGs): they are dropped silently here, as they cannot be
    # counted before decoding. Use verify="decode" to count them up front.
    ds = ds.ignore_errors(log_warning=False)
    info = SourceInfo(
        name=root,
        num_examples=len(paths),
        class_names=class_names or None,
        num_skipped=total - len(paths),
    )
    return ds, info


def _decodes(path):
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3,
                           expand_animations=False)
        return True
    except (tf.errors.OpError, ValueError):
        return False


# ---------------------------------------------------------------------------
# tensorflow_datasets
# ---------------------------------------------------------------------------
def _from_tfds(spec, shuffle, seed, split, data_dir):
    name = spec[len("tfds:"):]
    if not name:
        raise ValueError("use 'tfds:NAME' or 'tfds:NAME/CONFIG'.")
    try:
        import tensorflow_datasets as tfds  # lazy: optional dependency
    except ImportError as err:
        raise ImportError(
            f"{spec!r} needs tensorflow-datasets (pip install "
            "tensorflow-datasets)."
        ) from err
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"unknown TFDS dataset {name!r}.") from err
    try:
        ds = builder.as_dataset(
            split=split,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
    except AssertionError as err:  # raised by tfds when not prepared
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in "
            f"{data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')}"
            "; no download is attempted. Run `tfds build` on a machine with "
            "internet and copy the folder, or set TFDS_DATA_DIR."
        ) from err

    features = builder.info.features
    image_key = "image" if "image" in features else None
    if image_key is None:
        for key, feat in features.items():
            if isinstance(feat, tfds.features.Image):
                image_key = key
                break
    if image_key is None:
        raise ValueError(
            f"TFDS dataset {name!r} has no image feature "
            f"(features: {list(features)})."
        )
    label_key = None
    class_names = None
    if "label" in features and isinstance(features["label"],
                                          tfds.features.ClassLabel):
        label_key = "label"
        class_names = tuple(features["label"].names)

    def convert(ex):
        image = ex[image_key]
        if image.dtype != tf.uint8:
            image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image.set_shape([None, None, 3])
        label = (tf.cast(ex[label_key], tf.int32) if label_key
                 else tf.constant(-1, tf.int32))
        return image, label

    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    num = None
    try:
        num = int(builder.info.splits[split].num_examples) or None
    except Exception:  # splits unknown (e.g. mocked or partial metadata)
        pass
    if num is None:
        card = int(ds.cardinality())
        num = card if card >= 0 else None
    info = SourceInfo(name=spec, num_examples=num, class_names=class_names)
    return ds, info


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def load_source(data="synthetic_scenes", *, shuffle=False, seed=None,
                verify="header", split="train", data_dir=None):
    """Opens a source of images (see module docstring for ``data`` forms).

    Args:
        data: ``"synthetic_scenes[:N[:S]]"``, a folder path, ``"tfds:NAME"``,
            or numpy arrays (array / tuple / dict).
        shuffle: shuffle at the cheapest point (indices, file names, TFDS
            files + a 10k buffer), reshuffled every iteration.
        seed: int or None; makes shuffling reproducible.
        verify: folders only. ``"header"`` (default) skips files whose first
            bytes are not a JPEG/PNG/GIF/BMP/WebP signature; ``"decode"``
            also fully decodes every file once (slow; counts every bad
            file); ``"none"`` trusts the files. In every mode files failing
            at decode time are dropped by ``ignore_errors``.
        split: TFDS split (default ``"train"``).
        data_dir: TFDS data directory (default: tfds' own default).

    Returns:
        ``(dataset, info)``: ``tf.data.Dataset`` of ``(image uint8
        [H, W, 3], label int32 [])`` and a :class:`SourceInfo`.

    Raises:
        FileNotFoundError: missing folder / TFDS dataset not prepared.
        ValueError: no images, bad arrays or an unparsable spec.
    """
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        if data == "synthetic_scenes" or data.startswith("synthetic_scenes:"):
            return _from_synthetic(data, shuffle, seed)
        if data.startswith("tfds:"):
            return _from_tfds(data, shuffle, seed, split, data_dir)
        return _from_folder(data, shuffle, seed, verify)
    if isinstance(data, (np.ndarray, tuple, list, dict)):
        return _from_numpy(data, shuffle, seed)
    raise TypeError(
        "data must be 'synthetic_scenes[:N]', a folder path, 'tfds:NAME' or "
        f"numpy arrays; got {type(data).__name__}."
    )
