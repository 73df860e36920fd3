"""Weighted k-NN classification on frozen features (DINO ``eval_knn.py``).

For each test feature: cosine similarity to every train feature (both L2-normalised), the
top-k neighbours, each voting for its label with weight ``exp(sim / T)``; the class with the
largest summed weight wins. DINO reports k = 20, T = 0.07 on the teacher's CLS token.

The similarities are computed ``batch_size`` test rows at a time, so memory stays at
``batch_size x num_train`` floats whatever the test set size.

Ties are broken deterministically (the reference's ``torch.topk`` leaves them to the
device): among equally similar neighbours the lower train index is taken, and among classes
with equal votes the lower class id wins.
"""

import numpy as np

from keras_pqcl.eval.features import FeatureExtractor

__all__ = ["knn_accuracy", "knn_classify", "knn_evaluate"]


def _l2_normalize(x):
    # eps as torch.nn.functional.normalize, which the reference uses.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _as_features(x, name):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (num_examples, dim); got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {x.dtype}.")
    return x.astype(np.float32, copy=False)


def _as_labels(y, n, name):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one label per feature row; got {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids; got dtype {y.dtype}.")
    if y.size and y.min() < 0:
        raise ValueError(
            f"{name} contain negative ids ({int(y.min())}); unlabelled images (-1, e.g. files "
            "directly in a data folder's root) cannot be used: put each class in its own sub-folder."
        )
    return y.astype(np.int64)


def _top_k(sim, k):
    """Indices ``(B, k)`` of the k largest entries per row; ties -> lower index (deterministic)."""
    n = sim.shape[1]
    if k >= n:
        return np.argsort(-sim, axis=1, kind="stable")
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sim, top, axis=1).min(axis=1)
    # argpartition picks arbitrarily among values equal to the k-th: redo those rows stably.
    tied = (sim >= kth[:, None]).sum(axis=1) > k
    if tied.any():
        top[tied] = np.argsort(-sim[tied], axis=1, kind="stable")[:, :k]
    return top


def _validate(train_features, train_labels, test_features, k, temperature, num_classes, batch_size):
    train_x = _as_features(train_features, "train_features")
    test_x = _as_features(test_features, "test_features")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}; "
            "extract both with the same backbone and settings."
        )
    if len(train_x) == 0:
        raise ValueError("train_features is empty: k-NN needs at least one train example.")
    train_y = _as_labels(train_labels, len(train_x), "train_labels")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif train_y.max() >= num_classes:
        raise ValueError(f"train_labels go up to {int(train_y.max())} but num_classes={num_classes}.")
    return train_x, train_y, test_x, int(num_classes)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k=20,
    temperature=0.07,
    num_classes=None,
    batch_size=256,
    return_top5=False,
):
    """Weighted k-NN predictions.

    Args:
        train_features: ``(N_train, D)``; L2-normalised here.
        train_labels: int ``(N_train,)`` in ``[0, num_classes)``.
        test_features: ``(N_test, D)``.
        k: neighbours (clipped to ``N_train``); DINO reports 20.
        temperature: ``T`` of the vote weights ``exp(sim / T)``; 0.07 in DINO.
        num_classes: defaults to ``max(train_labels) + 1``.
        batch_size: test rows per similarity block (memory ``batch_size x N_train``).
        return_top5: also return the 5 best-voted classes.

    Returns:
        int64 predictions ``(N_test,)``; with ``return_top5`` also ``(N_test, min(5, C))``
        classes sorted by votes (best first).
    """
    train_x, train_y, test_x, num_classes = _validate(
        train_features, train_labels, test_features, k, temperature, num_classes, batch_size
    )
    train_x, test_x = _l2_normalize(train_x), _l2_normalize(test_x)
    k = min(int(k), len(train_x))
    top_n = min(5, num_classes)
    preds = np.zeros(len(test_x), np.int64)
    top5 = np.zeros((len(test_x), top_n), np.int64)
    rows = np.arange(min(batch_size, max(len(test_x), 1)))
    for start in range(0, len(test_x), batch_size):
        sim = test_x[start : start + batch_size] @ train_x.T  # (B, N_train)
        idx = _top_k(sim, k)
        # float64 votes: sums of exp(1 / 0.07) ~ 1.6e6 terms lose ties to rounding in float32.
        weights = np.exp(np.take_along_axis(sim, idx, axis=1).astype(np.float64) / temperature)
        votes = np.zeros((len(sim), num_classes), np.float64)
        np.add.at(votes, (rows[: len(sim), None], train_y[idx]), weights)
        order = np.argsort(-votes, axis=1, kind="stable")[:, :top_n]
        preds[start : start + batch_size] = order[:, 0]
        top5[start : start + batch_size] = order
    return (preds, top5) if return_top5 else preds


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k=20,
    temperature=0.07,
    num_classes=None,
    batch_size=256,
):
    """Top-1 and top-5 accuracy (in %, as the papers report) of :func:`knn_classify`.

    ``num_classes`` defaults to the largest label in train or test plus one. With fewer than
    five classes, top-5 counts the ``num_classes`` best (so it is 100 %).

    Returns:
        ``{"top1": float, "top5": float}``.
    """
    test_y = _as_labels(test_labels, len(np.asarray(test_features)), "test_labels")
    if num_classes is None:
        train_max = int(np.max(train_labels)) if np.size(train_labels) else -1
        num_classes = max(train_max, int(test_y.max()) if test_y.size else -1) + 1
    elif test_y.size and test_y.max() >= num_classes:
        raise ValueError(f"test_labels go up to {int(test_y.max())} but num_classes={num_classes}.")
    if test_y.size == 0:
        raise ValueError("test_features is empty: nothing to score.")
    preds, top5 = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
        return_top5=True,
    )
    top1 = float((preds == test_y).mean())
    in_top5 = float((top5 == test_y[:, None]).any(axis=1).mean())
    return {"top1": 100.0 * top1, "top5": 100.0 * in_top5}


def knn_evaluate(backbone, train, test, k=20, temperature=0.07, num_classes=None, batch_size=256, **feature_kwargs):
    """k-NN accuracy of ``backbone``'s features: extract (labelled) train and test, then score.

    Args:
        backbone: a ViT backbone (see :mod:`keras_pqcl.eval.features`).
        train, test: labelled data as :func:`extract_features` accepts it.
        feature_kwargs: ``n_last_blocks``, ``avgpool_patchtokens``, ``image_size``,
            ``preprocess``, ``crop_fraction``, ``antialias`` as in :func:`extract_features`, and
            ``feature_batch_size`` (images per forward pass). The reference uses the last
            block's CLS.

    Returns:
        ``{"top1", "top5", "k", "temperature", "num_train", "num_test", "feature_dim"}``.
    """
    feature_batch = feature_kwargs.pop("feature_batch_size", 64)
    n_last_blocks = feature_kwargs.pop("n_last_blocks", 1)
    avgpool = feature_kwargs.pop("avgpool_patchtokens", 0)
    extractor = FeatureExtractor(backbone, n_last_blocks, avgpool)  # one compile for both splits
    train_x, train_y = extractor.extract(train, batch_size=feature_batch, return_labels=True, **feature_kwargs)
    test_x, test_y = extractor.extract(test, batch_size=feature_batch, return_labels=True, **feature_kwargs)
    scores = knn_accuracy(
        train_x, train_y, test_x, test_y, k=k, temperature=temperature, num_classes=num_classes, batch_size=batch_size
    )
    return dict(
        scores,
        k=min(int(k), len(train_x)),
        temperature=float(temperature),
        num_train=len(train_x),
        num_test=len(test_x),
        feature_dim=int(train_x.shape[1]),
    )
