"""An output folder belongs to one run (pre-training or fine-tuning).

:class:`RunFolder` is entered before any data is built, so a mistake in ``--output`` costs
seconds, not a dataset scan. It

* checks the path: not a file, creatable, writable (each failure one message naming it);
* holds ``run.lock`` for the run's life with an OS file lock (``fcntl.flock``), which the
  kernel drops when the process dies however it dies, so a lock left by a killed run is
  stale by construction and is taken over, while a live run's lock stops a second run;
* refuses a folder that holds another run's artefacts unless the run resumes it
  (``resume=True``) or replaces it on purpose (``overwrite=True``, which deletes exactly
  the artefacts a run writes and nothing else);
* deletes temporaries that killed writes left behind (safe: the lock is held).
"""

import json
import os
import shutil
import socket
import time

from keras_pqcl.io.files import remove_temporaries

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the owner check below still applies.
    fcntl = None

LOCK_FILE = "run.lock"
#: What a pre-training run writes; ``overwrite`` deletes these and only these.
ARTEFACTS = (
    "checkpoints",
    "recipe.json",
    "summary.json",
    "log.csv",
    "loss.png",
    "tensorboard",
    "teacher_backbone.keras",
    "student_backbone.keras",
)


class RunFolderError(ValueError):
    """A run cannot use the folder; the message says why and what to do."""


class RunFolder:
    """Context manager owning ``path`` for one run (see the module docstring).

    Args:
        path: the output folder (created if missing).
        resume: the run continues the one in ``path``.
        overwrite: replace the run in ``path`` (its artefacts are deleted once the lock is held).
        log: where the one-line notices go.

    Attributes:
        path: absolute path.
        removed: temporaries deleted on entry.
    """

    def __init__(self, path, resume=False, overwrite=False, log=print):
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: pick one.")
        self.path = os.path.abspath(os.fspath(path))
        self.shown = os.fspath(path)
        self.resume = resume
        self.overwrite = overwrite
        self.log = log
        self.removed = []
        self._lock = None

    def join(self, *parts):
        return os.path.join(self.path, *parts)

    # ------------------------------------------------------------- checks
    def _check_path(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f"--output {self.shown!r} is a file, not a folder; pass a folder path.")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise RunFolderError(
                f"cannot create the output folder {self.shown!r}: {error.strerror or error}; "
                "pass an --output in a folder you can write to."
            ) from None
        probe = self.join(f".write-test-{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise RunFolderError(
                f"cannot write in the output folder {self.shown!r}: {error.strerror or error}; "
                "fix its permissions or pass another --output."
            ) from None

    def _acquire_lock(self):
        path = self.join(LOCK_FILE)
        handle = open(path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise RunFolderError(
                    f"{self.shown!r} is in use by another running keras-pqcl run ({owner}). Wait for it to finish, "
                    "or pass another --output."
                ) from None
        handle.seek(0)
        stale = handle.read().strip()
        if stale:
            self.log(f"keras-pqcl: taking over the lock of a run that is no longer running ({stale}).")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._lock = handle

    def artefacts(self):
        """The run artefacts present in the folder."""
        found = []
        for name in ARTEFACTS:
            path = self.join(name)
            if os.path.isdir(path):
                if os.listdir(path):
                    found.append(name)
            elif os.path.exists(path):
                found.append(name)
        return found

    def previous_recipe(self):
        """The ``recipe.json`` dict of the run in the folder, or None."""
        path = self.join("recipe.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as error:
            raise RunFolderError(
                f"{path} is unreadable ({error}); it records the settings of the run in {self.shown!r}. "
                "Restore it, or pass another --output."
            ) from None

    def _check_owner(self):
        found = self.artefacts()
        if not found or self.resume:
            return
        if self.overwrite:
            for name in found:
                path = self.join(name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            self.log(f"keras-pqcl: --overwrite: deleted the previous run's {', '.join(found)} in {self.shown}.")
            return
        raise RunFolderError(
            f"{self.shown!r} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}). "
            "Continue it with --resume, write to another --output, or replace it with --overwrite."
        )

    # ----------------------------------------------------------- context
    def __enter__(self):
        self._check_path()
        self._acquire_lock()
        try:
            self._check_owner()
            self.removed = remove_temporaries(self.path)
            if self.removed:
                self.log(f"keras-pqcl: removed {len(self.removed)} temporary file(s) left by an interrupted write.")
        except BaseException:
            self.release()
            raise
        return self

    def release(self):
        if self._lock is not None:
            try:
                self._lock.seek(0)
                self._lock.truncate()
            except OSError:
                pass
            self._lock.close()  # closing drops the flock
            self._lock = None

    def __exit__(self, *exc):
        self.release()
        return False
