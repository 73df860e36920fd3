"""Segmentation metrics as Keras metrics: mIoU, mAcc and aAcc from a confusion matrix.

The definitions are mmsegmentation's (``mmseg.evaluation.metrics.IoUMetric``): with the
pixels of every image accumulated over the whole evaluation set, for class c

* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` (intersection over union of the predicted and the
  true region), ``Acc_c = TP_c / (TP_c + FN_c)`` (recall of the true region);
* ``mIoU`` and ``mAcc`` average them over the classes where they are defined (a class absent
  from both target and prediction has no IoU; one absent from the target has no Acc);
* ``aAcc = sum_c TP_c / (number of labelled pixels)``.

Pixels whose target is ``ignore_index`` (or any id outside ``[0, num_classes)``) count
nowhere. Values are fractions in [0, 1] (multiply by 100 for the papers' tables).

The matrix is one float32 variable per metric, summed over replicas under a distribution
strategy (Keras metric variables aggregate by sum), so the scores are those of the whole
evaluation set, not a mean of per-batch or per-replica scores.
"""

import keras
from keras import ops

__all__ = ["ConfusionMatrixMetric", "MeanIoU", "MeanAccuracy", "PixelAccuracy", "segmentation_metrics"]


class ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates ``(C, C)`` counts, rows = target class, columns = predicted class.

    Args:
        num_classes: C.
        ignore_index: target value left out (255).

    ``update_state(y_true, y_pred)``: ``y_true`` class ids ``(B, H, W)`` (or ``(B, H, W, 1)``);
    ``y_pred`` logits or probabilities ``(B, H, W, C)`` (argmax taken) or ids ``(B, H, W)``.
    """

    def __init__(self, num_classes, ignore_index=255, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float32", name="confusion"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        c = self.num_classes
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        if len(y_true.shape) == 4:
            y_true = ops.squeeze(y_true, axis=-1)
        if len(y_pred.shape) == len(y_true.shape) + 1:
            y_pred = ops.argmax(y_pred, axis=-1)
        target = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        pred = ops.reshape(ops.cast(y_pred, "int32"), (-1,))
        valid = (target >= 0) & (target < c)
        if self.ignore_index is not None:
            valid = valid & (target != self.ignore_index)
        weights = ops.cast(valid, "float32")
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        # Ignored pixels go to cell 0 with weight 0; segment_sum has a static number of cells,
        # which bincount lacks under jit.
        cell = ops.where(valid, target * c + ops.clip(pred, 0, c - 1), 0)
        counts = ops.segment_sum(weights, cell, num_segments=c * c)
        self.confusion.assign_add(ops.reshape(counts, (c, c)))

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), "float32"))

    def _parts(self):
        m = ops.convert_to_tensor(self.confusion)
        tp = ops.diagonal(m)
        return tp, ops.sum(m, axis=1), ops.sum(m, axis=0)  # TP, target area, predicted area

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}


def _defined_mean(numer, denom):
    """Mean of ``numer / denom`` over the entries with ``denom > 0`` (0 when there are none)."""
    defined = ops.cast(denom > 0, "float32")
    ratio = numer / ops.maximum(denom, 1.0)
    return ops.sum(ratio * defined) / ops.maximum(ops.sum(defined), 1.0)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MeanIoU(ConfusionMatrixMetric):
    """mIoU: mean over classes of ``TP / (TP + FP + FN)`` (see the module docstring)."""

    def __init__(self, num_classes, ignore_index=255, name="mIoU", **kwargs):
        super().__init__(num_classes, ignore_index=ignore_index, name=name, **kwargs)

    def result(self):
        tp, target, pred = self._parts()
        return _defined_mean(tp, target + pred - tp)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MeanAccuracy(ConfusionMatrixMetric):
    """mAcc: mean over classes present in the target of ``TP / (TP + FN)``."""

    def __init__(self, num_classes, ignore_index=255, name="mAcc", **kwargs):
        super().__init__(num_classes, ignore_index=ignore_index, name=name, **kwargs)

    def result(self):
        tp, target, _ = self._parts()
        return _defined_mean(tp, target)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PixelAccuracy(ConfusionMatrixMetric):
    """aAcc: correctly classified labelled pixels over all labelled pixels."""

    def __init__(self, num_classes, ignore_index=255, name="aAcc", **kwargs):
        super().__init__(num_classes, ignore_index=ignore_index, name=name, **kwargs)

    def result(self):
        tp, target, _ = self._parts()
        return ops.sum(tp) / ops.maximum(ops.sum(target), 1.0)


def segmentation_metrics(num_classes, ignore_index=255):
    """``[MeanIoU, MeanAccuracy, PixelAccuracy]`` for ``compile(metrics=...)``."""
    return [cls(num_classes, ignore_index=ignore_index) for cls in (MeanIoU, MeanAccuracy, PixelAccuracy)]
