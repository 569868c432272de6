"""A process-wide memo of files whose sha256 was verified, so a store read of an unchanged file does not hash it
again (an adapter evicted from the CPU tier and read back pays the read, not the hash).

A file counts as unchanged while its device, inode, size and modification time (ns) are those it had when it was
hashed: rewriting or replacing a file changes them, so a file damaged since is hashed — and refused — again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

MAX_ENTRIES = 65536
CHUNK = 1 << 20


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class VerifiedFiles:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self.entries: OrderedDict[str, tuple[tuple, str]] = OrderedDict()  # path -> (identity, sha256)
        self.lock = threading.Lock()  # guards `entries` only; hashing runs outside it

    def sha256(self, path: Path) -> str:
        """The file's sha256, hashed only if the file changed since it was last hashed here."""
        key = str(path)
        before = _identity(os.stat(path))
        with self.lock:
            known = self.entries.get(key)
            if known is not None and known[0] == before:
                self.entries.move_to_end(key)
                return known[1]
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(CHUNK):
                digest.update(chunk)
        if _identity(os.stat(path)) == before:  # not changed while it was read: worth remembering
            with self.lock:
                self.entries[key] = (before, digest.hexdigest())
                while len(self.entries) > self.max_entries:
                    self.entries.popitem(last=False)
        return digest.hexdigest()


VERIFIED = VerifiedFiles()
