"""Linear probe on frozen features (DINO/iBOT ``eval_linear.py``).

Reference protocol: frozen backbone in eval mode; features = CLS tokens of the last ``n``
blocks (each through the final LayerNorm), optionally with the mean patch token
(``avgpool_patchtokens``); one ``Linear(dim, num_classes)`` with weights ``N(0, 0.01^2)`` and
zero bias; SGD, momentum 0.9, no weight decay, ``lr = 1e-3 * batch / 256``, cosine annealing
per epoch to 0 over 100 epochs; the best validation top-1 over the epochs is reported.

Difference from the reference, by default: the reference re-augments the train images every
epoch (RandomResizedCrop(224) + flip) and so runs the backbone on every epoch. Here the train
features are extracted once from the evaluation transform (``augment=False``), which makes
the probe cost one forward pass plus a cheap classifier fit. ``augment=True`` follows the
reference (one RandomResizedCrop(scale 0.08-1) + flip pass of the backbone per epoch), at
``epochs`` times the extraction cost. The reference also sweeps the learning rate
(``eval_linear_multi``); small data sets usually need a larger one than the default rule.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_pqcl.data import augment as augment_lib
from keras_pqcl.data.crops import random_resized_crop
from keras_pqcl.data.sources import load_source
from keras_pqcl.eval.features import FeatureExtractor, split_element

__all__ = ["EpochCosine", "linear_probe", "train_linear_classifier"]


class EpochCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch, as the reference.

    Epoch ``e`` (0-based) trains at ``lr * (1 + cos(pi * e / epochs)) / 2``.
    """

    def __init__(self, lr, epochs, steps_per_epoch):
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)

    def __call__(self, step):
        epoch = ops.floor(ops.cast(step, "float32") / float(self.steps_per_epoch))
        return self.lr * 0.5 * (1.0 + ops.cos(math.pi * epoch / float(self.epochs)))

    def get_config(self):
        return dict(lr=self.lr, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch)


def _check_labels(labels, num_classes, name):
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]. "
            "Unlabelled images (-1) cannot be used for a probe."
        )
    return labels.astype(np.int64)


def train_linear_classifier(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes=None,
    epochs=100,
    lr=None,
    batch_size=256,
    momentum=0.9,
    seed=0,
    verbose=0,
    train_features_per_epoch=None,
):
    """Fits the reference linear classifier on fixed features and scores it every epoch.

    Args:
        train_features: ``(N_train, F)``; test_features ``(N_test, F)``.
        train_labels, test_labels: int ``(N,)`` in ``[0, num_classes)``.
        num_classes: defaults to the largest label plus one.
        epochs: cosine length and number of epochs (100 in the reference).
        lr: None for ``1e-3 * batch_size / 256``.
        batch_size: classifier batch (the reference: 1024 over 8 GPUs).
        momentum: SGD momentum (0.9); no weight decay.
        seed: classifier initialisation seed.
        train_features_per_epoch: optional ``epoch -> (features, labels)`` giving fresh
            (augmented) train features for each epoch; ``train_features`` is then only used
            for shapes.

    Returns:
        dict with ``top1`` (best over epochs, %) and ``top5`` (at that epoch), ``best_epoch``
        (1-based), ``last_top1``, ``last_top5``, ``lr``, ``history`` (per-epoch ``top1``,
        ``top5``, ``loss``) and sizes.
    """
    train_x = np.asarray(train_features, np.float32)
    test_x = np.asarray(test_features, np.float32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"features must be (N, F) with the same F for train and test; got {train_x.shape} and {test_x.shape}."
        )
    if len(train_labels) != len(train_x) or len(test_labels) != len(test_x):
        raise ValueError(
            f"one label per feature row: train {len(train_x)} rows / {len(train_labels)} labels, "
            f"test {len(test_x)} rows / {len(test_labels)} labels."
        )
    if num_classes is None:
        num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    train_y = _check_labels(train_labels, num_classes, "train_labels")
    test_y = _check_labels(test_labels, num_classes, "test_labels")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}.")
    batch_size = int(min(batch_size, len(train_x)))
    lr = 1e-3 * batch_size / 256.0 if lr is None else float(lr)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)

    top_n = min(5, num_classes)
    classifier = keras.Sequential(
        [
            keras.Input((train_x.shape[1],)),
            keras.layers.Dense(
                num_classes,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
                bias_initializer="zeros",
            ),
        ],
        name="linear_classifier",
    )
    classifier.compile(
        optimizer=keras.optimizers.SGD(EpochCosine(lr, epochs, steps_per_epoch), momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseTopKCategoricalAccuracy(k=1, name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=top_n, name="top5"),
        ],
    )
    fit_args = dict(
        batch_size=batch_size,
        validation_data=(test_x, test_y),
        validation_batch_size=256,
        shuffle=True,
        verbose=verbose,
    )
    if train_features_per_epoch is None:
        history = classifier.fit(train_x, train_y, epochs=int(epochs), **fit_args).history
    else:
        history = {}
        for epoch in range(int(epochs)):
            x, y = train_features_per_epoch(epoch)
            h = classifier.fit(
                np.asarray(x, np.float32),
                _check_labels(y, num_classes, "train_labels"),
                epochs=epoch + 1,
                initial_epoch=epoch,
                **fit_args,
            ).history
            for key, values in h.items():
                history.setdefault(key, []).extend(values)

    top1 = [100.0 * v for v in history["val_top1"]]
    top5 = [100.0 * v for v in history["val_top5"]]
    best = int(np.argmax(top1))  # first best epoch, as the reference's running max
    return {
        "top1": top1[best],
        "top5": top5[best],
        "best_epoch": best + 1,
        "last_top1": top1[-1],
        "last_top5": top5[-1],
        "lr": lr,
        "epochs": int(epochs),
        "batch_size": batch_size,
        "num_classes": int(num_classes),
        "feature_dim": int(train_x.shape[1]),
        "num_train": len(train_x),
        "num_test": len(test_x),
        "history": {"top1": top1, "top5": top5, "loss": [float(v) for v in history["loss"]]},
    }


def _augmented_dataset(train, epoch, image_size, seed):
    """The reference's train transform: RandomResizedCrop(scale 0.08-1) + flip, normalised."""
    if isinstance(train, tf.data.Dataset):
        dataset = train.unbatch() if len(split_element(train.element_spec)[0].shape) == 4 else train
    else:
        dataset, _ = load_source(train, shuffle=False)

    def transform(index, element):
        image, label = split_element(element)
        if label is None:
            raise ValueError("the linear probe needs labelled train data.")
        crop_seed = tf.stack([tf.constant(seed * 100003 + epoch, tf.int64), tf.cast(index, tf.int64)])
        crop, _, _ = random_resized_crop(
            augment_lib.to_float01(image), crop_seed, image_size, scale=(0.08, 1.0), flip_p=0.5, antialias=False
        )
        crop = augment_lib.normalize(tf.clip_by_value(crop, 0.0, 1.0))
        return crop, label

    return dataset.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def linear_probe(
    backbone,
    train,
    test,
    num_classes=None,
    n_last_blocks=4,
    avgpool_patchtokens=0,
    epochs=100,
    lr=None,
    batch_size=256,
    momentum=0.9,
    image_size=None,
    preprocess=True,
    augment=False,
    feature_batch_size=64,
    seed=0,
    verbose=0,
):
    """Linear-probe accuracy of a frozen backbone (see the module docstring for the protocol).

    Args:
        backbone: a ViT backbone (see :mod:`keras_pqcl.eval.features`).
        train, test: labelled data, anything :func:`extract_features` accepts with labels
            (``(images, labels)`` arrays, a dataset of ``(image, label)``, a folder, ...).
        num_classes: defaults to the largest label plus one.
        n_last_blocks: CLS of the last n blocks (clipped to the depth). 4 for ViT-S in the
            reference, 1 (with ``avgpool_patchtokens=2``) for ViT-B.
        avgpool_patchtokens: 0 CLS, 1 mean patch token, 2 both.
        epochs, lr, batch_size, momentum, seed, verbose: see :func:`train_linear_classifier`.
            ``lr`` may also be a list of rates: one classifier per rate on the same features,
            and the result with the best top-1 is returned (the reference sweeps the rate).
            With ``augment=True`` each rate's classifier re-extracts its augmented features
            every epoch, so a sweep costs that many times the backbone passes.
        image_size: evaluation size; None uses ``backbone.image_size``.
        preprocess: apply :func:`eval_preprocess` (False: images already normalised).
        augment: re-augment the train images each epoch as the reference does (slow: one
            backbone pass per epoch). Default False: features extracted once.
        feature_batch_size: images per backbone forward pass.

    Returns:
        :func:`train_linear_classifier`'s dict plus ``n_last_blocks`` and
        ``avgpool_patchtokens``; accuracies in %.
    """
    rates = lr if isinstance(lr, (list, tuple)) else [lr]
    if not rates:
        raise ValueError("lr is an empty list: give one learning rate, None for the default rule, or a list of rates.")
    extractor = FeatureExtractor(backbone, n_last_blocks, avgpool_patchtokens)  # one compile for all
    feature_args = dict(batch_size=feature_batch_size, image_size=image_size, preprocess=preprocess, return_labels=True)
    train_x, train_y = extractor.extract(train, **feature_args)
    test_x, test_y = extractor.extract(test, **feature_args)

    per_epoch = None
    if augment:
        if not preprocess:
            raise ValueError("augment=True needs raw images (preprocess=True): it crops and normalises them.")
        size = image_size or getattr(backbone, "image_size", None)
        if size is None:
            raise ValueError("augment=True needs image_size (the backbone has no image_size attribute).")
        feature_args.update(preprocess=False, image_size=None)

        def per_epoch(epoch):
            return extractor.extract(_augmented_dataset(train, epoch, size, seed), **feature_args)

    result = max(
        (
            train_linear_classifier(
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes=num_classes,
                epochs=epochs,
                lr=rate,
                batch_size=batch_size,
                momentum=momentum,
                seed=seed,
                verbose=verbose,
                train_features_per_epoch=per_epoch,
            )
            for rate in rates
        ),
        key=lambda r: r["top1"],
    )
    result.update(
        n_last_blocks=extractor.n_last_blocks, avgpool_patchtokens=extractor.avgpool_patchtokens, augment=bool(augment)
    )
    return result
