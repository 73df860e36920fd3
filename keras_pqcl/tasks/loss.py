"""Per-pixel cross-entropy with an ignore index, the loss of semantic segmentation."""

import keras
from keras import ops


def pixel_cross_entropy(labels, logits, ignore_index=255):
    """Mean over labelled pixels of ``-log softmax(logits)[label]``.

    Args:
        labels: class ids ``(B, H, W)`` (or ``(B, H, W, 1)``); pixels equal to
            ``ignore_index`` (or outside ``[0, C)``) do not count.
        logits: ``(B, H, W, C)``.

    Returns:
        scalar; 0 when no pixel is labelled. (PyTorch's ``cross_entropy(ignore_index=...)``
        with the default mean reduction.)
    """
    num_classes = logits.shape[-1]
    labels = ops.cast(labels, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    safe = ops.where(valid, labels, 0)
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    picked = ops.take_along_axis(log_probs, ops.expand_dims(safe, -1), axis=-1)[..., 0]
    weights = ops.cast(valid, "float32")
    return -ops.sum(picked * weights) / ops.maximum(ops.sum(weights), 1.0)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PixelCrossEntropy(keras.losses.Loss):
    """:func:`pixel_cross_entropy` as a Keras loss (``compile(loss=...)``)."""

    def __init__(self, ignore_index=255, name="pixel_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def call(self, y_true, y_pred):
        return pixel_cross_entropy(y_true, y_pred, self.ignore_index)

    def get_config(self):
        return {**super().get_config(), "ignore_index": self.ignore_index}
