"""Detect the two collapse modes of self-distillation and say so (optionally stop).

Caron et al. (DINO, 2021, §5.3) describe two trivial solutions that centering and sharpening
balance: *uniform* collapse (every output is the uniform distribution; each cross-entropy
term then sits at its floor ``ln K``) and *one-prototype* collapse (every image maps to the
same prototype; the entropy of the teacher's batch-averaged output falls towards 0). Both
show in the epoch logs the methods write, so this callback reads them at each epoch end.

Which logged terms are such cross-entropies, and over how many prototypes, is the model's
declaration (``model.collapse_terms``, ``{log name: K}``); the guard knows no method by name.
A model that declares none (the InfoNCE methods, DenseCL and MCL) has nothing to watch, and
the guard says so once when training begins.
"""

import math

import keras


class CollapseGuard(keras.callbacks.Callback):
    """Warn (and with ``stop=True`` stop training) when a run has collapsed.

    Args:
        terms: ``{log name: K}``, the terms to watch and their numbers of prototypes;
            ``None`` (default) reads ``model.collapse_terms``.
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

    def __init__(self, terms=None, patience=3, uniform_tol=0.01, entropy_floor=0.1, stop=False):
        super().__init__()
        self.terms = None if terms is None else dict(terms)
        self.patience = int(patience)
        self.uniform_tol = float(uniform_tol)
        self.entropy_floor = float(entropy_floor)
        self.stop = bool(stop)
        self.message = None
        self._streaks = {"uniform": 0, "one_prototype": 0}
        self._told = False

    def watched(self):
        """``{log name: K}`` watched for the current model (empty: nothing to watch)."""
        if self.terms is not None:
            return self.terms
        return dict(getattr(self.model, "collapse_terms", None) or {})

    def symptoms(self, logs, terms):
        """The collapse modes ``logs`` (one epoch's means) show, as ``{mode: detail}``, for
        the watched ``terms`` ``{log name: K}``."""
        found = {}
        floors = {t: math.log(k) for t, k in terms.items() if t in logs}
        values = {t: float(logs[t]) for t in floors}
        if values and all(v >= (1.0 - self.uniform_tol) * floors[t] for t, v in values.items()):
            if len(set(floors.values())) == 1:
                shown = ", ".join(f"{t} {v:.3f}" for t, v in values.items())
                found["uniform"] = f"{shown} at ln K = {next(iter(floors.values())):.3f}"
            else:
                found["uniform"] = ", ".join(f"{t} {v:.3f} at ln K = {floors[t]:.3f}" for t, v in values.items())
        entropy = logs.get("teacher_entropy")
        if entropy is not None and float(entropy) < self.entropy_floor:
            # The teacher entropy is that of the first declared term's distribution (the CLS).
            floor = math.log(next(iter(terms.values())))
            found["one_prototype"] = f"teacher_entropy {float(entropy):.3f} nats (healthy: near ln K = {floor:.2f})"
        return found

    def on_train_begin(self, logs=None):
        if not self.watched() and not self._told:
            self._told = True  # once, although a resumed run may call fit twice
            print(
                f"keras-pqcl: the collapse guard has nothing to watch for {type(self.model).__name__}: it "
                "declares no cross-entropy over prototypes (collapse_terms is empty)."
            )

    def on_epoch_end(self, epoch, logs=None):
        terms = self.watched()
        if not logs or not terms:
            return
        found = self.symptoms(logs, terms)
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
