"""Crash-safe file writes: a file is either its old or its new content, never half of one."""

import os
import tempfile

#: Prefix of the temporaries below; a run folder's owner deletes leftovers of killed writes.
TEMP_PREFIX = ".tmp-"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory):
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write ``path`` through ``write(tmp_path)`` into a temporary beside it, then rename.

    A crash or kill mid-write leaves the previous ``path`` intact: ``os.replace`` is atomic
    on POSIX and Windows when both paths are on one file system. The temporary gets the
    permissions an ordinary ``open(path, "w")`` would give (``mkstemp`` makes it 0600), is
    flushed to disk before the rename, and is removed when ``write`` fails.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def remove_temporaries(directory):
    """Delete the temporaries that killed :func:`atomic_write` calls left in ``directory``
    and its sub-folders. Only call it while no other process writes there (a run holds the
    folder's lock). Returns the paths removed."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed
