"""One ``keras-pqcl pretrain`` process of a tiny recipe that can kill itself (SIGKILL) at a
chosen point, for the fault-injection tests in ``tests/test_resume.py``.

Usage::

    python tests/scripts/killable_run.py OUTPUT [KILL] [extra CLI arguments...]

``KILL`` is ``-`` (run to the end) or ``POINT:N``: ``kill -9`` this process at the N-th
(1-based, counted in this process) occurrence of POINT:

* ``step``: right after a training step (mid-epoch, between checkpoints);
* ``save``: inside a checkpoint write, after the model is in the temporary file and before
  it is renamed into place (leaves a ``.tmp-*`` file behind);
* ``saved``: right after a checkpoint is renamed into place, before older ones are pruned;
* ``log``: right after ``log.csv`` is rewritten, before the epoch's checkpoint;
* ``knn``: during the k-NN evaluation, before its score reaches the log.

``random:SEED`` instead kills the process at a random moment (seeded) within the first
second after training starts, wherever it then is: mid-step most often.

``KILLABLE_NAN_AT_STEP=N`` in the environment instead makes the N-th step's update blow up:
a student weight becomes NaN right after that step (the loss of the step itself was finite).

The kill points are patched in from here, so the library carries no test hooks.
"""

import os
import signal
import sys

RECIPE = """
from keras_pqcl.recipe import Recipe

def get_recipe():
    return Recipe(
        name="killable", method="{method}", backbone="vit_tiny", patch_size=8, drop_path_rate=0.1,
        backbone_args=dict(embed_dim=32, depth=2, num_heads=2),
        method_args=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
        data="synthetic_scenes:32:32",
        crops=dict(global_size=16, local_size=8, n_local=2),
        masks=dict(ratio=0.3, ratio_var=0.0),
        batch_size=8, epochs=3, warmup_epochs=1, knn_every=2, checkpoint_every_steps=3,
    )
"""


def write_recipe(folder, method="dino"):
    """The tiny recipe as a file in ``folder``; returns its path."""
    path = os.path.join(folder, "killable_recipe.py")
    # Written whole, then renamed into place: under torchrun every process writes it, and a
    # process importing it must never see another's half-written file.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(RECIPE.format(method=method))
    os.replace(tmp, path)
    return path


def _die_at(kill, point):
    if kill == "-" or kill.startswith("random:"):
        return lambda: None
    name, count = kill.split(":")
    seen = [0]

    def hit():
        if name != point:
            return
        seen[0] += 1
        if seen[0] == int(count):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def main(output, kill="-", *extra):
    from keras_pqcl import cli, training
    from keras_pqcl.callbacks import checkpoint, epoch_log, knn_monitor

    training.KNN_SYNTHETIC_IMAGES = (64, 32)  # small held-out splits: a test, not a score

    step_hit, save_hit, saved_hit, log_hit, knn_hit = (
        _die_at(kill, p) for p in ("step", "save", "saved", "log", "knn")
    )

    guard_end = checkpoint.NaNGuard.on_train_batch_end
    nan_at = int(os.environ.get("KILLABLE_NAN_AT_STEP", 0))
    steps = [0]

    def on_train_batch_end(self, batch, logs=None):
        guard_end(self, batch, logs)
        step_hit()
        steps[0] += 1
        if steps[0] == nan_at:
            import numpy as np

            if hasattr(self.model, "jax_state_sync"):
                self.model.jax_state_sync()
            variable = self.model.student_backbone.trainable_variables[0]
            variable.assign(np.full(variable.shape, np.nan, "float32"))

    checkpoint.NaNGuard.on_train_batch_end = on_train_batch_end

    atomic_write = checkpoint.atomic_write

    def killable_write(path, write):
        def wrapped(tmp):
            write(tmp)
            save_hit()

        atomic_write(path, wrapped)
        saved_hit()

    checkpoint.atomic_write = killable_write

    log_write = epoch_log.EpochLog.write

    def write(self):
        log_write(self)
        log_hit()

    epoch_log.EpochLog.write = write

    evaluate = knn_monitor.KNNMonitor.evaluate

    def killable_evaluate(self):
        knn_hit()
        return evaluate(self)

    knn_monitor.KNNMonitor.evaluate = killable_evaluate

    if kill.startswith("random:"):
        import random
        import threading

        delay = random.Random(int(kill.split(":")[1])).uniform(0.0, 1.0)
        train_begin = checkpoint.Checkpoint.on_train_begin

        def on_train_begin(self, logs=None):
            train_begin(self, logs)
            if not getattr(main, "timer", None):
                main.timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL))
                main.timer.start()

        checkpoint.Checkpoint.on_train_begin = on_train_begin

    recipe = write_recipe(os.path.dirname(os.path.abspath(output)), os.environ.get("KILLABLE_METHOD", "dino"))
    return cli.main(["pretrain", "--recipe", recipe, "--output", output, "--quiet", *extra])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
