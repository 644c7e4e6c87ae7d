"""Local directories for messages of a store that keeps them elsewhere (memory, PostgreSQL).

The filesystem store's message directory is where the message lives; the other stores keep
one here, per store object, for what the script's side needs on this machine (its ``job/``
working directory). They last as long as the store object, in a private temporary directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class ScratchDirs:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def root(self) -> Path:
        """The private temporary directory, made on first use."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix)
        return Path(self._tmp.name)

    def message_dir(self, queue: str, msg_id: str) -> Path:
        """``<tmp>/<queue>/<id>``, with its ``job/`` directory, made on first use (the caller
        has validated both names)."""
        d = self.root() / queue / msg_id
        (d / "job").mkdir(parents=True, exist_ok=True)
        return d

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
