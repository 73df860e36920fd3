"""DINOv2's KoLeo regulariser (Oquab et al., 2023; Sablayrolles et al., ICLR 2019).

The Kozachenko-Leonenko differential-entropy estimator on the student's L2-normalised CLS
features of each global view: with ``x_i`` the normalised feature of image ``i`` and
``d_i = ||x_i - x_nn(i) + eps||_2`` its distance to its nearest other image in the batch,
``L = -mean_i log(d_i + eps)``, ``eps = 1e-8``, summed over the global views. It pushes the
images of a batch apart, spreading the features over the sphere. DINOv2 weighs it 0.1.
"""

import keras
from keras import ops

from keras_pqcl.models.terms.base import Term

EPS = 1e-8


def koleo(features):
    """``-mean_i log(||x_i - x_nn(i) + eps|| + eps)`` of ``features`` ``(B, D)``, float32."""
    x = ops.cast(features, "float32")
    x = x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), EPS)
    dots = ops.matmul(x, ops.transpose(x))
    # Each image's nearest neighbour among the others: its own dot product is set to -1.
    n = ops.shape(x)[0]
    dots = ops.where(ops.eye(n, dtype="bool"), -1.0, dots)
    neighbours = ops.take(x, ops.argmax(dots, axis=1), axis=0)
    distances = ops.sqrt(ops.sum(ops.square(x - neighbours + EPS), axis=-1))
    return -ops.mean(ops.log(distances + EPS))


@keras.saving.register_keras_serializable(package="keras_pqcl")
class KoLeo(Term):
    """KoLeo on the student's CLS features of each global view, summed over the views.

    Args:
        weight: its factor in the loss (DINOv2: 0.1).

    Logs: ``koleo`` (epoch mean, unweighted).
    """

    log_name = "koleo"

    def __init__(self, weight=0.1, **kwargs):
        super().__init__(weight=weight, **kwargs)

    def loss(self, outputs, values):
        views = ops.reshape(outputs.student["cls_features"], (outputs.n_global, outputs.batch, -1))
        value = sum(koleo(views[g]) for g in range(outputs.n_global))
        return value, {self.log_name: value}
