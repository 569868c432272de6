"""The memo of verified files: an unchanged file is not hashed twice, a changed one always is."""

from __future__ import annotations

import hashlib
import os

from hub.store.verified import VerifiedFiles


def test_an_unchanged_file_is_hashed_once_and_a_changed_one_again(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"weights" * 1000)
    memo = VerifiedFiles()
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr("hub.store.verified.hashlib.sha256", lambda *a: hashed.append(1) or real(*a))
    first = memo.sha256(path)
    assert memo.sha256(path) == first and len(hashed) == 1
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, rewritten in place
    path.write_bytes(bytes(data))
    assert memo.sha256(path) == real(bytes(data)).hexdigest() != first and len(hashed) == 2
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same identity: remembered
    assert memo.sha256(path) != first and len(hashed) == 2


def test_the_memo_is_bounded(tmp_path):
    memo = VerifiedFiles(max_entries=3)
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(bytes([i]))
        memo.sha256(tmp_path / f"f{i}")
    assert list(memo.entries) == [str(tmp_path / f"f{i}") for i in (2, 3, 4)]
