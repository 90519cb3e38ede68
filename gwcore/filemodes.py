"""Who may read what gwcore keeps on disk: the one place that decides the modes of the data dir,
the blob dir and every file gwcore makes in them (docs/security.md, "Files on disk").

The store holds every accepted message and, with the databus, every large property: it is as
private as the secrets. Whatever the process umask, the data dir and the blob dir are made
``0700`` and the store's files ``0600`` (``GWCORE_FILE_MODE=private``, the default), or ``0750``
and ``0640`` for a group that must read them, a backup job's (``GWCORE_FILE_MODE=group``). An
existing store is brought to these modes when it is opened for writing.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ("FILE_MODES", "Modes", "modes")

log = logging.getLogger("gwcore.store")

#: GWCORE_FILE_MODE value -> (directory mode, file mode)
FILE_MODES = {"private": (0o700, 0o600), "group": (0o750, 0o640)}


class Modes:
    """The directory and file modes of one setting, and the operations that apply them."""

    __slots__ = ("name", "dir", "file")

    def __init__(self, name: str) -> None:
        if name not in FILE_MODES:
            raise ValueError(f"file mode {name!r}: use one of {', '.join(FILE_MODES)}")
        self.name = name
        self.dir, self.file = FILE_MODES[name]

    def make_dir(self, path: str) -> None:
        """Create *path* (and its missing parents) if needed, and give it the directory mode."""
        os.makedirs(path, mode=self.dir, exist_ok=True)
        self._chmod(path, self.dir)

    def secure(self, path: str) -> None:
        """Give the existing file *path* the file mode (nothing if it does not exist)."""
        if os.path.lexists(path):
            self._chmod(path, self.file)

    def open_new(self, path: str, flags: int) -> int:
        """``os.open`` of a file that must not exist yet (``O_CREAT | O_EXCL`` in *flags*), with the
        file mode whatever the umask."""
        fd = os.open(path, flags, self.file)
        if self.file & ~0o600:
            try:
                os.fchmod(fd, self.file)  # the umask may have taken the group bits
            except BaseException:
                os.close(fd)
                raise
        return fd

    @staticmethod
    def _chmod(path: str, mode: int) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
            return
        try:
            os.chmod(path, mode)
        except PermissionError as exc:
            # not our file (a blob dir shared with other instances, owned by another user)
            log.warning("cannot set the mode of %s to %o: %s", path, mode, exc)


#: The default, for code that makes files before any settings are known (the lease, tests).
PRIVATE = Modes("private")


def modes(name: str) -> Modes:
    """The :class:`Modes` of a ``GWCORE_FILE_MODE`` value."""
    return PRIVATE if name == "private" else Modes(name)
