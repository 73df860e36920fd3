"""Evaluation protocols of DINO/iBOT/PQCL on frozen backbones, as their official code runs them.

* :func:`extract_features`, :func:`eval_preprocess` - frozen CLS / pooled / patch features.
* :func:`knn_accuracy`, :func:`knn_classify`, :func:`knn_evaluate` - weighted k-NN
  (k = 20, T = 0.07).
* :func:`linear_probe`, :func:`train_linear_classifier` - linear classifier on the last
  blocks' CLS tokens (SGD, momentum 0.9, cosine, ``lr = 1e-3 * batch / 256``).
* :func:`dense_probe`, :func:`miou`, :func:`load_segmentation_folder` - per-pixel linear
  probe on patch tokens, scored by mIoU and pixel accuracy.
* :func:`attention_maps`, :func:`feature_pca`, :func:`save_attention_png`,
  :func:`save_pca_png` - last-block CLS attention per head and patch-feature PCA.

Accuracies, mIoU and pixel accuracy are reported in percent, as the papers do.
"""

from keras_pqcl.eval.dense import (
    confusion_matrix,
    dense_probe,
    load_segmentation_folder,
    miou,
    segmentation_scores,
)
from keras_pqcl.eval.features import eval_preprocess, extract_features
from keras_pqcl.eval.knn import knn_accuracy, knn_classify, knn_evaluate
from keras_pqcl.eval.linear import linear_probe, train_linear_classifier
from keras_pqcl.eval.visualize import (
    attention_maps,
    cls_attention,
    feature_pca,
    prepare_image,
    save_attention_png,
    save_pca_png,
    threshold_attention,
)

__all__ = [
    "attention_maps",
    "cls_attention",
    "confusion_matrix",
    "dense_probe",
    "eval_preprocess",
    "extract_features",
    "feature_pca",
    "knn_accuracy",
    "knn_classify",
    "knn_evaluate",
    "linear_probe",
    "load_segmentation_folder",
    "miou",
    "prepare_image",
    "save_attention_png",
    "save_pca_png",
    "segmentation_scores",
    "threshold_attention",
    "train_linear_classifier",
]
