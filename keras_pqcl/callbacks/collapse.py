"""Detect the two collapse modes of self-distillation and say so (optionally stop).

Caron et al. (DINO, 2021, §5.3) describe two trivial solutions that centering and sharpening
balance: *uniform* collapse (every output is the uniform distribution; each cross-entropy
term then sits at its floor ``ln K``) and *one-prototype* collapse (every image maps to the
same prototype; the entropy of the teacher's batch-averaged output falls towards 0). Both
show in the epoch logs the methods write, so this callback reads them at each epoch end.
"""

import math

import keras

#: Cross-entropy terms that sit at ln K under uniform collapse (whichever the model logs).
COLLAPSE_TERMS = ("cls", "mim", "query")


class CollapseGuard(keras.callbacks.Callback):
    """Warn (and with ``stop=True`` stop training) when a run has collapsed.

    Args:
        out_dim: ``K``, the number of prototypes; ``None`` reads ``model.out_dim``.
        patience: consecutive epochs a symptom must last before it counts (3).
        uniform_tol: a term counts as "at ln K" when it is ``>= (1 - uniform_tol) ln K``
            (0.01). A term of a freshly initialised model also starts near ``ln K``; the
            patience lets it fall first.
        entropy_floor: one-prototype collapse when ``teacher_entropy`` (nats, logged by the
            methods) stays below this (0.1; a healthy run keeps it near ``ln K``).
        stop: stop training (after the epoch's callbacks, so checkpoints and logs are
            written) instead of only warning.

    After training, :attr:`message` holds the diagnosis (or ``None``).
    """

    def __init__(self, out_dim=None, patience=3, uniform_tol=0.01, entropy_floor=0.1, stop=False):
        super().__init__()
        self.out_dim = out_dim
        self.patience = int(patience)
        self.uniform_tol = float(uniform_tol)
        self.entropy_floor = float(entropy_floor)
        self.stop = bool(stop)
        self.message = None
        self._streaks = {"uniform": 0, "one_prototype": 0}

    def symptoms(self, logs, out_dim):
        """The collapse modes ``logs`` (one epoch's means) show, as ``{mode: detail}``."""
        found = {}
        floor = math.log(out_dim)
        terms = [t for t in COLLAPSE_TERMS if t in logs] or ["loss"]
        values = {t: float(logs[t]) for t in terms}
        if all(v >= (1.0 - self.uniform_tol) * floor for v in values.values()):
            shown = ", ".join(f"{t} {v:.3f}" for t, v in values.items())
            found["uniform"] = f"{shown} at ln K = {floor:.3f}"
        entropy = logs.get("teacher_entropy")
        if entropy is not None and float(entropy) < self.entropy_floor:
            found["one_prototype"] = f"teacher_entropy {float(entropy):.3f} nats (healthy: near ln K = {floor:.2f})"
        return found

    def on_epoch_end(self, epoch, logs=None):
        out_dim = self.out_dim or getattr(self.model, "out_dim", None)
        if not logs or not out_dim:
            return
        found = self.symptoms(logs, out_dim)
        for mode in self._streaks:
            self._streaks[mode] = self._streaks[mode] + 1 if mode in found else 0
        lasting = [m for m, n in self._streaks.items() if n >= self.patience]
        if not lasting or self.message:
            return
        mode = lasting[0]
        if mode == "uniform":
            self.message = (
                f"Training has collapsed to the uniform distribution ({found[mode]} for {self.patience} "
                "epochs): student and teacher output the same flat distribution for every image. Usual "
                "fixes: sharpen the teacher (lower teacher_temp / warmup_teacher_temp), lower base_lr, "
                "raise teacher_momentum, or weaken the augmentations for small images and models."
            )
        else:
            self.message = (
                f"Training has collapsed to one prototype ({found[mode]} for {self.patience} epochs): "
                "every image maps to the same output. Usual fixes: keep centering on "
                "(center_momentum 0.9), raise teacher_temp, lower base_lr."
            )
        print(f"\nkeras-pqcl: {self.message}" + (" Stopping." if self.stop else ""))
        if self.stop:
            self.model.stop_training = True
