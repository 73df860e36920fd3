"""A loss term of the self-distillation model: its requirements, schedules, loss and logs.

:class:`~keras_pqcl.models.SelfDistillation` runs one teacher and one student forward pass
per step and hands what they computed (a :class:`StepOutputs`) to each of its terms. A term
declares beforehand what that pass must contain, so nothing is computed for a term that is
absent:

* ``needs()``: the backbone and batch requirements
  (:class:`~keras_pqcl.models.needs.Needs`: mask token, position table, batch entries);
* ``student_patches`` / ``teacher_patches``: the patch-token logits of the global views;
* ``local_cls``: the student also encodes the local crops (their CLS logits);
* ``teacher_local_patches``: the teacher encodes each local crop (its patch logits);
* ``student_masks(model, step)`` and ``query_tokens(model, step)``: what a term adds to
  the student's input (masks of the global views, query tokens appended to them).

Its loss owns its own center; its teacher temperature follows its own
:class:`~keras_pqcl.schedules.EpochRamp`, evaluated by the model with the other per-step
values and passed in as ``values[term.temperature_name]``.
"""

import keras

from keras_pqcl.models.needs import Needs
from keras_pqcl.schedules import EpochRamp


class StepOutputs:
    """What one step's forward passes computed, for the terms to read.

    With ``G`` global views of ``B`` images, view-major (row ``g * B + b``), ``K`` prototypes,
    ``N`` patches of a global view, ``T`` query tokens, ``n`` local crops:

    Attributes:
        data: the batch dict; step: the optimizer step (scalar); n_global: ``G``;
            batch: ``B`` (may be a symbolic size).
        student: ``"cls"`` ``(G B, K)``, ``"cls_features"`` ``(G B, D)`` (the backbone's
            CLS before the head), and, when asked for, ``"patches"`` ``(G B, N, K_p)`` and
            ``"queries"`` ``(G B, T, K)``.
        teacher: ``"cls"`` and, when asked for, ``"patches"`` and ``"queries"``; no gradient.
        student_crops_cls: ``((G + n) B, K)``, the CLS logits of every crop the student
            encoded, the global views first, then the local crops; None when it encoded no
            local crop.
        teacher_local_patches: ``(B, T, K)``: each local crop encoded on its own, crops
            concatenated along the tokens; or None.
        masks: bool ``(G B, N)`` of the student's masked patches, or None.
    """

    def __init__(self, data, step, n_global, batch):
        self.data, self.step, self.n_global, self.batch = data, step, n_global, batch
        self.student, self.teacher = {}, {}
        self.student_crops_cls = self.teacher_local_patches = self.masks = None

    @property
    def n_crops(self):
        """``G + n``, the crops of ``student_crops_cls``, as a static int (the batch size may
        be symbolic: a reshape by ``(-1, B, K)`` would lose the crop count in a graph)."""
        return self.n_global + self.data["local_crops"].shape[1]


class Term(keras.layers.Layer):
    """Base of the loss terms: declarations with their defaults (nothing needed).

    Args:
        weight: the term's factor in the total loss (the papers' ``lambda``).

    Class attributes a term overrides:
        log_name: the name of its value in the logs (its epoch mean).
        monitors: further per-step values it logs as epoch means.
        temperature_name: the log name of its teacher temperature, or None.
    """

    log_name = None
    monitors = ()
    temperature_name = None
    student_patches = teacher_patches = local_cls = teacher_local_patches = False
    #: ``{"pos_embed" | "mask_token": why}`` added to the backbone check's error.
    backbone_reasons = {}

    def __init__(self, weight=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("name", self.log_name)
        super().__init__(**kwargs)
        self.weight = float(weight)
        self.built = True  # a term's variables are its losses' centers, made with them

    def needs(self):
        """What this term needs from the backbone and the batches."""
        return Needs()

    @property
    def prototypes(self):
        """``K`` when the term is a cross-entropy over ``K`` prototypes (it sits at ``ln K``
        under uniform collapse; :class:`~keras_pqcl.callbacks.CollapseGuard`), else None."""
        return None

    def schedules(self):
        """``{log name: schedule}`` of the per-step values the term reads (its temperature)."""
        return {}

    def student_masks(self, model, outputs):
        """Bool ``(G B, N)`` masks of the student's global views, or None (no masks)."""
        return None

    def query_tokens(self, model, outputs):
        """``(student, teacher)`` query tokens ``(G B, T, D)`` appended to the global views
        (teacher None: the teacher sees none), or None when the term adds no queries."""
        return None

    def loss(self, outputs, values):
        """``(value, logs)``: the scalar term and ``{log name: value}`` (the term's own log
        name included); ``values`` holds every schedule's value at this step."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(weight=self.weight)
        return config


class DistillationTerm(Term):
    """A cross-entropy between student and centered, sharpened teacher distributions over
    ``K`` prototypes: its loss (``loss_class``, which owns the center) and the teacher
    temperature's :class:`~keras_pqcl.schedules.EpochRamp` (default 0.04 -> 0.07 over 30
    epochs, as DINO, iBOT and PQCL).

    Args:
        out_dim: ``K``. student_temp: 0.1. center_momentum: 0.9.
        teacher_temp: an ``EpochRamp`` or its config.
    """

    loss_class = None
    #: the loss layer's name, so its center's path is the same in every model.
    loss_name = None

    def __init__(self, out_dim, student_temp=0.1, teacher_temp=None, center_momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.out_dim = int(out_dim)
        if teacher_temp is None:
            teacher_temp = EpochRamp(0.04, 0.07, 30)
        self.teacher_temp = EpochRamp(**teacher_temp) if isinstance(teacher_temp, dict) else teacher_temp
        self.distillation = self.loss_class(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, name=self.loss_name
        )

    @property
    def center(self):
        return self.distillation.center

    @property
    def prototypes(self):
        return self.out_dim

    def schedules(self):
        return {self.temperature_name: self.teacher_temp}

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            student_temp=self.distillation.student_temp,
            teacher_temp=self.teacher_temp.get_config(),
            center_momentum=self.distillation.center_momentum,
        )
        return config
