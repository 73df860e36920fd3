"""k-NN accuracy of the backbone on held-out labelled data, logged during pre-training."""

import keras

# keras_pqcl.eval imports TensorFlow; it is imported in the methods that extract features so
# that importing the callbacks (and keras_pqcl) does not need TensorFlow.


class KNNMonitor(keras.callbacks.Callback):
    """Adds ``knn_top1`` (%, DINO's weighted k-NN on the CLS token) to the epoch logs.

    At the end of the first epoch, of every ``every``-th epoch and of epoch ``last_epoch``,
    the CLS features of ``model.teacher_backbone`` (or ``student_backbone``) are extracted
    for ``train_data`` (the neighbour bank) and ``test_data``, and the k-NN top-1 accuracy
    is written into the logs dict. Other epochs leave the key out. Which epochs are
    evaluated depends on the epoch number alone, so a resumed run evaluates the same epochs
    as an uninterrupted one.

    Keras hands the *same* logs dict to the callbacks in list order, so the value is only
    seen by callbacks that come after this one: put ``KNNMonitor`` **before** the loggers
    (:class:`~keras_pqcl.callbacks.EpochLog`, ``TensorBoard``) and checkpoints that monitor
    ``knn_top1``. (Keras' ``CSVLogger`` fixes its columns at the first epoch it sees; the
    ``EpochLog`` adds a column when a key first appears.)

    Args:
        train_data, test_data: labelled data, as :func:`keras_pqcl.eval.extract_features`
            accepts with labels: ``(images, labels)`` arrays (uint8 or float in [0, 1]), a
            ``tf.data.Dataset`` of ``(image, label)``, a folder... Keep them small: both are
            re-encoded each time.
        every: evaluate every ``every`` epochs.
        k, temperature: k-NN settings (DINO: 20, 0.07).
        use: ``"teacher"`` (the reference evaluates the teacher) or ``"student"``.
        image_size: evaluation size; None uses the backbone's ``image_size``.
        batch_size: images per forward pass.
        num_classes: defaults to the largest label plus one.
        last_epoch: also evaluate at the end of this (0-based) epoch, the run's last, so the
            final score belongs to the final backbone; None: only the schedule above.
        local_copy: evaluate a copy of the backbone that lives on this process alone, its
            weights refreshed before each evaluation. For the chief of a multi-process run,
            which evaluates while the others train on: under JAX and TensorFlow the
            backbone's own variables span the processes, and a forward pass of them would
            wait for processes that never run it.

    After training, :attr:`history` holds ``(epoch, top1, top5)`` tuples (0-based epochs).
    """

    def __init__(
        self,
        train_data,
        test_data,
        every=1,
        k=20,
        temperature=0.07,
        use="teacher",
        image_size=None,
        batch_size=64,
        num_classes=None,
        last_epoch=None,
        local_copy=False,
    ):
        super().__init__()
        if use not in ("teacher", "student"):
            raise ValueError(f"use must be 'teacher' or 'student'; got {use!r}.")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1; got {every}.")
        self.train_data = train_data
        self.test_data = test_data
        self.every = int(every)
        self.k = int(k)
        self.temperature = float(temperature)
        self.use = use
        self.image_size = image_size
        self.batch_size = int(batch_size)
        self.num_classes = num_classes
        self.last_epoch = last_epoch
        self.local_copy = bool(local_copy)
        self.history = []
        self._extractor = None
        self._copy = self._copy_of = None

    def _backbone(self):
        name = f"{self.use}_backbone"
        backbone = getattr(self.model, name, None)
        if backbone is None:
            raise TypeError(
                f"KNNMonitor needs a model with a {name!r} (a keras_pqcl self-supervised model); "
                f"got {type(self.model).__name__}."
            )
        return backbone

    def _evaluated(self):
        """The network to evaluate: the backbone, or with ``local_copy`` its process-local
        copy holding the backbone's current weights."""
        backbone = self._backbone()
        if not self.local_copy:
            return backbone
        if self._copy is None or self._copy_of is not backbone:
            # Kept across epochs with its compiled forward pass; only the weights change.
            self._copy, self._copy_of = type(backbone).from_config(backbone.get_config()), backbone
        self._copy.set_weights(backbone.get_weights())
        return self._copy

    def on_train_begin(self, logs=None):
        self._backbone()  # fail before the first epoch, not after it

    def evaluate(self):
        """``{"top1", "top5"}`` of the current backbone (%)."""
        from keras_pqcl.backend import process_local
        from keras_pqcl.eval.features import FeatureExtractor
        from keras_pqcl.eval.knn import knn_accuracy

        with process_local():
            network = self._evaluated()
            if self._extractor is None or self._extractor.backbone is not network:
                # Kept across epochs: the compiled forward pass reads the current weights.
                self._extractor = FeatureExtractor(network)
            args = dict(batch_size=self.batch_size, image_size=self.image_size, return_labels=True)
            train_x, train_y = self._extractor.extract(self.train_data, **args)
            test_x, test_y = self._extractor.extract(self.test_data, **args)
        return knn_accuracy(
            train_x, train_y, test_x, test_y, k=self.k, temperature=self.temperature, num_classes=self.num_classes
        )

    def due(self, epoch):
        """Whether the end of (0-based) ``epoch`` is evaluated."""
        return epoch == 0 or (epoch + 1) % self.every == 0 or epoch == self.last_epoch

    def on_epoch_end(self, epoch, logs=None):
        if not self.due(epoch):
            return
        scores = self.evaluate()
        self.history.append((epoch, scores["top1"], scores["top5"]))
        if logs is not None:
            logs["knn_top1"] = scores["top1"]
