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
  directly in the root get -1. Files that fail the check (``verify``: the
  header, or a full decode) are skipped with ONE warning giving their count
  and names (``SourceInfo.skipped_files`` lists all of them). Image formats
  TensorFlow cannot decode (``.tif .tiff .heic .heif .avif .jp2`` ...,
  :data:`UNSUPPORTED_IMAGE_EXTENSIONS`) are not read; one warning names them
  (``SourceInfo.unsupported_files``).
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
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "SourceInfo",
    "indexed_source",
    "load_source",
    "list_image_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# Image formats that tf.io.decode_image cannot read. Files with these
# extensions are reported by name instead of being silently left out of the
# count (a folder of TIFFs would otherwise look like an empty folder).
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
    ".jp2",
    ".j2k",
    ".jpx",
    ".jxl",
    ".ico",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".psd",
    ".exr",
    ".hdr",
    ".dng",
    ".cr2",
    ".nef",
    ".arw",
    ".raw",
    ".svg",
)

# Names listed in one warning; the rest are counted ("and N more").
_MAX_NAMED = 10

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
            it counts files that passed the check of ``verify``: with
            ``"header"`` a file corrupt past its header is counted and then
            dropped at decode time; with ``"decode"`` the count is exact.
        class_names: tuple of class names (label k = class_names[k]) or None.
        num_skipped: files skipped before decoding (folders only):
            ``len(skipped_files)``.
        skipped_files: paths of the skipped files (unreadable or corrupt),
            all of them, sorted.
        unsupported_files: paths of files in formats TensorFlow cannot
            decode (``.tif`` ...), not read and not counted (folders only).
        verified: True when ``num_examples`` is exact, i.e. every counted
            example will be produced: in-memory arrays, or a folder whose
            every counted file decoded (``verify="decode"``).
    """

    name: str
    num_examples: Optional[int]
    class_names: Optional[Tuple[str, ...]]
    num_skipped: int = 0
    skipped_files: Tuple[str, ...] = ()
    unsupported_files: Tuple[str, ...] = ()
    verified: bool = False


# ---------------------------------------------------------------------------
# numpy
# ---------------------------------------------------------------------------
def _as_uint8_rgb(images):
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W] grayscale
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"images must be an array [N, H, W, 3] (or grayscale [N, H, W] / [N, H, W, 1]); got shape {images.shape}."
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
                f"float images must lie in [0, 1]; got values in [{lo:g}, {hi:g}]. Divide by 255 or pass uint8 images."
            )
        images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(images.dtype, np.integer):
        lo, hi = int(np.min(images)), int(np.max(images))
        if lo < 0 or hi > 255:
            raise ValueError(f"integer images must lie in [0, 255]; got [{lo}, {hi}] (dtype {images.dtype}).")
        images = images.astype(np.uint8)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1]; got dtype {images.dtype}.")
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _array_fetch(images, labels):
    """``fetch(i)``: example ``i`` (int64 scalar tensor) of the arrays as
    ``(image uint8 [H, W, 3], label int32 [])``, with TensorFlow ops."""
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

    return fetch


def _numpy_arrays(data):
    """Validated ``(images uint8 [N, H, W, 3], labels int32 [N])`` of a numpy source."""
    labels = None
    if isinstance(data, dict):
        keys = set(data)
        img_key = "images" if "images" in keys else "image" if "image" in keys else None
        if img_key is None:
            raise ValueError(f"a dict source needs an 'images' (or 'image') entry; got keys {sorted(keys)}.")
        images = data[img_key]
        labels = data.get("labels", data.get("label"))
    elif isinstance(data, (tuple, list)):
        if not 1 <= len(data) <= 2:
            raise ValueError(f"a tuple source must be (images,) or (images, labels); got {len(data)} entries.")
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
            raise ValueError(f"labels must have shape [N] = [{n}]; got {labels.shape}.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
        labels = labels.astype(np.int32)
    return images, labels


# ---------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _cached_synthetic(num, size):
    out = synthetic_lib.synthetic_scenes(num, image_size=size, seed=0)
    return out["images"], out["labels"]


def parse_synthetic(spec):
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


def _synthetic_arrays(spec):
    """``(images, labels, info)`` of a ``"synthetic_scenes[:N[:S]]"`` spec."""
    num, size = parse_synthetic(spec)
    images, labels = _cached_synthetic(num, size)
    info = SourceInfo(
        name=f"synthetic_scenes:{num}:{size}",
        num_examples=num,
        class_names=tuple(synthetic_lib.SYNTHETIC_CLASS_NAMES),
        verified=True,
    )
    return images, labels, info


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


def _scan(root):
    """``(image_paths, unsupported_paths)`` below ``root``, both sorted by walk order."""
    paths, unsupported = [], []
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
            lower = fname.lower()
            if lower.endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(dirpath, fname))
            elif lower.endswith(UNSUPPORTED_IMAGE_EXTENSIONS):
                unsupported.append(os.path.join(dirpath, fname))
    return paths, unsupported


def _folder_labels(root, paths):
    """``(labels int32 [n], class_names)`` from the first-level sub-folders."""
    top = []
    for p in paths:
        rel = os.path.relpath(p, root)
        parts = rel.split(os.sep)
        top.append(parts[0] if len(parts) > 1 else None)
    class_names = tuple(sorted({t for t in top if t is not None}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[t] if t is not None else -1 for t in top], np.int32)
    return labels, class_names


def list_image_files(root):
    """Lists image files below ``root`` with labels from sub-folder names.

    Returns:
        ``(paths, labels, class_names)``: sorted list of str, int32 numpy
        ``[n]`` (-1 for images directly in ``root``), tuple of names (empty
        when there are no first-level sub-folders with images).
    """
    paths, _ = _scan(root)
    labels, class_names = _folder_labels(root, paths)
    return paths, labels, class_names


def _decode_file(path, label):
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image, label


def _decode_failures(paths):
    """Bool numpy ``[n]``: True where ``paths[i]`` cannot be read or decoded.

    One parallel ``tf.data`` pass decodes every file once. A failing file
    would abort a plain pass, so each element carries its index, failures
    are dropped by ``ignore_errors`` and the missing indices name the bad
    files (order does not matter, hence ``deterministic=False``).
    """
    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n, dtype=tf.int64), tf.constant(paths, tf.string)))

    @tf.autograph.experimental.do_not_convert
    def check(i, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        # Returning a value computed from the pixels keeps the decode from
        # being pruned as dead code; the shape is the cheapest such value.
        return i, tf.shape(image)

    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors(log_warning=False).map(lambda i, shape: i)
    decoded = np.zeros([n], bool)
    for index in ds.batch(4096).as_numpy_iterator():
        decoded[index] = True
    return ~decoded


def _name_list(paths, root):
    """``"a.png, b/c.jpg and 3 more"``: names relative to ``root``."""
    rel = [os.path.relpath(p, root) for p in paths]
    text = ", ".join(rel[:_MAX_NAMED])
    if len(rel) > _MAX_NAMED:
        text += f" and {len(rel) - _MAX_NAMED} more"
    return text


def _folder_files(root, verify):
    """Lists, checks and counts a folder's images.

    Returns:
        ``(paths, labels, info)``: the usable files (list of str), their
        labels int32 numpy ``[n]`` and the :class:`SourceInfo`.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder not found: {root!r}")
    if not os.path.isdir(root):
        raise ValueError(
            f"{root!r} is a file; pass a folder of images, 'synthetic_scenes', 'tfds:NAME' or numpy arrays."
        )
    if verify not in ("header", "decode", "none"):
        raise ValueError(f"verify must be 'header', 'decode' or 'none'; got {verify!r}.")
    paths, unsupported = _scan(root)
    if unsupported:
        found = (
            f"{len(unsupported)} files in formats TensorFlow cannot "
            f"decode ({_name_list(unsupported, root)}); convert them to "
            "PNG or JPEG to use them"
        )
    if not paths:
        raise ValueError(
            f"no image files found in folder {root!r} (searched recursively "
            f"for extensions {', '.join(IMAGE_EXTENSIONS)})" + (f"; found {found}." if unsupported else ".")
        )
    if unsupported:
        warnings.warn(f"{root!r}: not using {found}.", stacklevel=4)
    total = len(paths)
    bad = []
    if verify in ("header", "decode"):
        keep = np.array([_looks_like_image(p) for p in paths], bool)
        if verify == "decode" and keep.any():
            # Only the files with a valid header are decoded.
            candidates = [p for p, k in zip(paths, keep) if k]
            keep[np.flatnonzero(keep)[_decode_failures(candidates)]] = False
        bad = [p for p, k in zip(paths, keep) if not k]
        paths = [p for p, k in zip(paths, keep) if k]
        if bad:
            check = "header is not a JPEG/PNG/GIF/BMP/WebP signature"
            if verify == "decode":
                check += ", or the file failed to read or decode"
            warnings.warn(
                f"skipped {len(bad)} of {total} image files in {root!r} that "
                f"are unreadable or corrupt ({check}): "
                f"{_name_list(bad, root)}.",
                stacklevel=4,
            )
        if not paths:
            raise ValueError(
                f"none of the {total} image files in folder {root!r} could be "
                f"read (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})."
            )
    labels, class_names = _folder_labels(root, paths)
    info = SourceInfo(
        name=root,
        num_examples=len(paths),
        class_names=class_names or None,
        num_skipped=len(bad),
        skipped_files=tuple(bad),
        unsupported_files=tuple(unsupported),
        verified=verify == "decode",
    )
    return paths, labels, info


def _folder_fetch(paths, labels):
    """``fetch(i)``: file ``i`` (int64 scalar tensor) decoded, with its label."""
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.int32)

    def fetch(i):
        return _decode_file(tf.gather(paths_t, i), tf.gather(labels_t, i))

    return fetch


# ---------------------------------------------------------------------------
# tensorflow_datasets
# ---------------------------------------------------------------------------
def _from_tfds(spec, shuffle, seed, split, data_dir):
    name = spec[len("tfds:") :]
    if not name:
        raise ValueError("use 'tfds:NAME' or 'tfds:NAME/CONFIG'.")
    try:
        import tensorflow_datasets as tfds  # lazy: optional dependency
    except ImportError as err:
        raise ImportError(f"{spec!r} needs tensorflow-datasets (pip install tensorflow-datasets).") from err
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
        raise ValueError(f"TFDS dataset {name!r} has no image feature (features: {list(features)}).")
    label_key = None
    class_names = None
    if "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
        label_key = "label"
        class_names = tuple(features["label"].names)

    def convert(ex):
        image = ex[image_key]
        if image.dtype != tf.uint8:
            image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image.set_shape([None, None, 3])
        label = tf.cast(ex[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
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
def load_source(data="synthetic_scenes", *, shuffle=False, seed=None, verify="header", split="train", data_dir=None):
    """Opens a source of images (see module docstring for ``data`` forms).

    Args:
        data: ``"synthetic_scenes[:N[:S]]"``, a folder path, ``"tfds:NAME"``,
            or numpy arrays (array / tuple / dict).
        shuffle: shuffle at the cheapest point (indices, file names, TFDS
            files + a 10k buffer), reshuffled every iteration.
        seed: int or None; makes shuffling reproducible.
        verify: folders only. ``"header"`` (default) skips files whose first
            bytes are not a JPEG/PNG/GIF/BMP/WebP signature; ``"decode"``
            also decodes every file once, in one parallel pass (about the
            cost of one epoch's decoding), so that the count is exact and
            every bad file is named (``info.verified`` True); ``"none"``
            trusts the files. In every mode files failing at decode time
            are dropped by ``ignore_errors``.
        split: TFDS split (default ``"train"``).
        data_dir: TFDS data directory (default: tfds' own default).

    Returns:
        ``(dataset, info)``: ``tf.data.Dataset`` of ``(image uint8
        [H, W, 3], label int32 [])`` and a :class:`SourceInfo`.

    Raises:
        FileNotFoundError: missing folder / TFDS dataset not prepared.
        ValueError: no images, bad arrays or an unparsable spec.
    """
    indexed = indexed_source(data, verify=verify, split=split, data_dir=data_dir)
    if indexed is None:
        return _from_tfds(data, shuffle, seed, split, data_dir)
    fetch, info = indexed
    n = info.num_examples
    # Shuffle indices (cheap) rather than decoded images.
    index = tf.data.Dataset.range(n)
    if shuffle:
        index = index.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = index.map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
    if _is_folder(data):
        # Safety net for files whose header is fine but whose data is not (e.g.
        # truncated PNGs): they are dropped silently here, as they cannot be
        # counted before decoding. Use verify="decode" to count them up front.
        ds = ds.ignore_errors(log_warning=False)
    return ds, info


def _is_synthetic(spec):
    return spec == "synthetic_scenes" or spec.startswith("synthetic_scenes:")


def _is_folder(data):
    """Whether ``data`` names an image folder: the one source read from files."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return isinstance(data, str) and not _is_synthetic(data) and not data.startswith("tfds:")


def indexed_source(data="synthetic_scenes", *, verify="header", split="train", data_dir=None):
    """Random-access form of a source: example ``i`` without reading ``0..i-1``.

    Streams that must start anywhere (``pretrain_dataset(..., epochs=E,
    start=...)``) use it to permute indices statelessly.

    Args:
        data, verify, split, data_dir: as in :func:`load_source`.

    Returns:
        ``(fetch, info)``: ``fetch(i)`` maps an int64 scalar tensor ``0 <= i
        < info.num_examples`` to ``(image uint8 [H, W, 3], label int32 [])``
        with TensorFlow ops (for ``Dataset.map``); for a folder ``i`` indexes
        the sorted list of usable files. ``None`` for sources that can only
        be read in order (``"tfds:NAME"``).

    Raises:
        As :func:`load_source`.
    """
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        if _is_synthetic(data):
            images, labels, info = _synthetic_arrays(data)
            return _array_fetch(images, labels), info
        if data.startswith("tfds:"):
            return None
        paths, labels, info = _folder_files(data, verify)
        return _folder_fetch(paths, labels), info
    if isinstance(data, (np.ndarray, tuple, list, dict)):
        images, labels = _numpy_arrays(data)
        info = SourceInfo(name="numpy", num_examples=images.shape[0], class_names=None, verified=True)
        return _array_fetch(images, labels), info
    raise TypeError(
        f"data must be 'synthetic_scenes[:N]', a folder path, 'tfds:NAME' or numpy arrays; got {type(data).__name__}."
    )
