"""Callbacks for pre-training."""

from keras_pqcl.callbacks.collapse import CollapseGuard
from keras_pqcl.callbacks.checkpoint import Checkpoint, NaNGuard, load_checkpoint, load_latest_checkpoint
from keras_pqcl.callbacks.epoch_log import EpochLog
from keras_pqcl.callbacks.knn_monitor import KNNMonitor
