"""Process settings that make TensorFlow a faster engine for the input pipeline.

Two TensorFlow runtime settings cost the multi-crop pipeline about a fifth of its CPU time
on a 2-core machine (``benchmarks/pipeline.py`` prints both ways):

* **The CPU allocator.** Every batch of DINO crops is about 150 MB of float32, and
  TensorFlow's default CPU allocator hands buffers that large to the operating system
  when they are freed, so each new batch faults its pages in again (about a tenth of
  the pipeline's CPU time went to page faults). The BFC allocator
  (``TF_CPU_ALLOCATOR_USE_BFC=true``, the allocator TensorFlow uses on GPUs) keeps the
  memory and reuses it. The process then holds its peak memory instead of returning it.
* **The intra-op thread pool.** ``tf.data`` already runs one example (or batch) per
  core; letting each op split itself over the same cores again only adds wake-ups and
  spinning. When TensorFlow does nothing but the input pipeline (``KERAS_BACKEND`` jax
  or torch), one intra-op thread is faster. With the TensorFlow backend the training
  step needs that pool, so it is left alone.

Both have to be chosen before TensorFlow runs its first op. :func:`tune_input_pipeline`
applies what it still can and says what it could not; ``keras-pqcl pretrain`` calls it
first thing. Settings the user made explicitly (``TF_CPU_ALLOCATOR_USE_BFC``,
``TF_NUM_INTRAOP_THREADS``) are kept.
"""

import logging
import os

__all__ = ["tune_input_pipeline"]

_logger = logging.getLogger(__name__)


def tune_input_pipeline(input_only=None, bfc_allocator=True):
    """Tunes this process's TensorFlow runtime for the ``tf.data`` pipeline.

    Call it before TensorFlow runs any op (right after the imports).

    Args:
        input_only: True when TensorFlow runs only the input pipeline in this process;
            its intra-op thread pool is then cut to one thread. None (default) = True
            unless the Keras backend is TensorFlow.
        bfc_allocator: use TensorFlow's BFC allocator for CPU memory (reused, never
            returned to the system). Default True.

    Returns:
        dict: ``{"bfc_allocator": bool, "intra_op_threads": int or None}``, what is in
        effect (``None`` = TensorFlow's default pool).
    """
    import tensorflow as tf

    if input_only is None:
        import keras

        input_only = keras.backend.backend() != "tensorflow"
    late = []
    started = _runtime_started(tf)
    if bfc_allocator and not started:
        # Read when TensorFlow first allocates CPU memory, so an environment variable
        # set now still counts if no op has run yet.
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    if input_only and "TF_NUM_INTRAOP_THREADS" not in os.environ:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
        except RuntimeError:
            late.append("one intra-op thread")
    # The allocator is chosen from the variable at the first allocation, which happened
    # before this call when the runtime had already started.
    bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")
    if bfc_allocator and started and not bfc:
        late.append("the BFC allocator")
    if late:
        _logger.warning(
            "keras_pqcl: TensorFlow had already run ops, so %s could not be set for the "
            "input pipeline (it stays correct, only slower). Call "
            "keras_pqcl.data.tune_input_pipeline() right after the imports.",
            " and ".join(late),
        )
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return {"bfc_allocator": bfc, "intra_op_threads": threads or None}


def _runtime_started(tf):
    """Whether TensorFlow's eager runtime exists yet (it starts with the first op)."""
    try:
        from tensorflow.python.eager import context
    except ImportError:  # a TensorFlow without that module: assume the worst
        return True
    return context.context()._context_handle is not None
