"""Per-process shards of the global batch, for multi-process training.

With ``N`` training processes and a global batch of ``B`` examples, process ``i`` feeds
examples ``[i B / N, (i + 1) B / N)`` of every global batch: its *shard*. The shards of one
step are disjoint and, concatenated in process order, are the batch one process would read
(the order in which JAX's ``make_array_from_process_local_data`` and the torch/TensorFlow
gradient sums put them together). The selection happens on the example stream before any
example is augmented (and, for the resumable stream of an indexed source, before it is
read), and each example keeps the augmentation seed of its global position, so a shard is
exactly the corresponding slice of the one-process batch, not merely a similar one.
"""

import dataclasses

import tensorflow as tf

__all__ = ["Shard"]


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count``: the part of each global batch this process feeds.

    ``Shard()`` (0 of 1) is the whole batch. ``keras_pqcl.backend.process_shard()`` gives
    the running process's shard.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (_is_int(self.count) and self.count >= 1):
            raise ValueError(f"Shard count must be a positive int (the number of processes), got {self.count!r}.")
        if not (_is_int(self.index) and 0 <= self.index < self.count):
            raise ValueError(
                f"Shard index must be an int in [0, {self.count}) (this process's id), got {self.index!r}."
            )

    def local_batch(self, batch_size):
        """``B / N``: the examples this process feeds per step of global batch ``B``.

        Raises:
            ValueError: ``B`` does not divide by ``N``.
        """
        if batch_size % self.count:
            raise ValueError(
                f"the global batch_size={batch_size} does not divide by the {self.count} processes; "
                f"use a multiple of {self.count}."
            )
        return batch_size // self.count

    def keeps(self, position, batch_size):
        """Bool tensor: does example ``position`` (int64, counted from a batch boundary of
        the unbatched global stream) belong to this shard?"""
        local = self.local_batch(batch_size)
        return tf.equal(position % batch_size // local, self.index)

    def select(self, examples, batch_size, position=None):
        """This shard's elements of the unbatched global stream ``examples``.

        Args:
            examples: ``tf.data.Dataset`` of examples in global order, whose first element
                starts a global batch.
            batch_size: the global batch ``B``.
            position: ``fn(*element) -> int64`` giving an element's position in the stream;
                default: its index in ``examples``.

        Returns:
            The dataset of the kept elements, unchanged; batching it by
            :meth:`local_batch` gives this process's part of each global batch.
        """
        if self.count == 1:
            return examples
        self.local_batch(batch_size)  # the divisibility error before any tf.data work
        if position is not None:
            return examples.filter(
                tf.autograph.experimental.do_not_convert(lambda *x: self.keeps(position(*x), batch_size))
            )
        indexed = examples.enumerate().filter(
            tf.autograph.experimental.do_not_convert(lambda i, x: self.keeps(i, batch_size))
        )
        return indexed.map(tf.autograph.experimental.do_not_convert(lambda i, x: x))
