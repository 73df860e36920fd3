"""The loss terms of :class:`~keras_pqcl.models.SelfDistillation`, by name.

A new term is one module here that subclasses :class:`Term` and one entry in :data:`TERMS`.
"""

from keras_pqcl.models.terms.base import StepOutputs, Term
from keras_pqcl.models.terms.cls_distillation import CLSDistillation
from keras_pqcl.models.terms.koleo import KoLeo
from keras_pqcl.models.terms.masked_patches import MaskedPatchDistillation
from keras_pqcl.models.terms.queries import PositionalQueries, QueryCrops

#: term name -> class: DINO's CLS distillation, iBOT's masked patches, PQCL's positional
#: queries, ADCLR's query crops, DINOv2's KoLeo.
TERMS = {
    "cls": CLSDistillation,
    "mim": MaskedPatchDistillation,
    "positional_queries": PositionalQueries,
    "query_crops": QueryCrops,
    "koleo": KoLeo,
}
