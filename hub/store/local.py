"""The adapter store in a local folder: versioned, checksummed, atomically published task adapters.

Layout (`hub.store.layout`): ``<root>/<name>/<version>/`` holds the kind's payload files and ``hub.json`` (the
run export's metadata plus ``name``, ``version``, ``created_at`` and the sha256 of every payload file).
Directories starting with ``.`` (``.tmp-*`` staging, ``.trash-*`` removal) are internal and never listed; `gc`
removes stale ones. A publish stages a folder and renames it into place, so readers never see half a version.

Every version is validated fully (hub.json's schema, payload files, checksums, no pickle files, no symbolic
links) before it is listed as usable; a bad one is *skipped* with its reason, and the newest good version of a
name is the one served. Validation results are cached per version folder until any of its files changes, and
forgotten when the folder goes.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

from safetensors.torch import load_file

from hub.errors import HubError, IntegrityError, NotFoundError
from hub.store.export import read_export, stage_payload
from hub.store.fileio import fsync_dir, fsync_file, utc_now, write_json
from hub.store.format import AdapterMeta
from hub.store.layout import (
    HUB_JSON, INTERNAL_PREFIXES, MAX_PUBLISH_ATTEMPTS, PICKLE_SUFFIXES, STALE_AFTER_S, TRAIN_LOG, checked_files,
)
from hub.store.refs import Ref, validate_name, version_key
from hub.store.versions import (
    AdapterSummary, LoadedAdapter, SkippedVersion, StoredVersion, loaded_adapter, read_training_log,
)
from hub.store.verified import VERIFIED

Checked = tuple[tuple, "StoredVersion | str"]  # (folder signature, the version or why it is skipped)


class AdapterStore:
    """Versioned adapters under one root directory; safe for concurrent publishers and readers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._checked: dict[Path, dict[Path, Checked]] = {}  # name folder -> version folder -> result

    def __str__(self) -> str:
        return str(self.root)

    # ---- publishing -------------------------------------------------------------------

    def publish(self, run_export: str | Path, name: str | None = None, version: str | None = None) -> StoredVersion:
        """Copy a validated run export into the store as ``name@version``, all or nothing.

        Files are staged in ``<root>/.tmp-<uuid>`` and the directory is renamed into place,
        so readers never see a partial version.
        """
        if name is not None:
            validate_name(name)
        if version is not None:
            validate_name(version, "version")
        export = read_export(Path(run_export))
        name = validate_name(name if name is not None else export.meta.name)
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files = stage_payload(export, name, staging)
            return self._commit(staging, export.meta, files, name, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _commit(self, staging: Path, meta: AdapterMeta, files: dict[str, str], name: str,
                version: str | None) -> StoredVersion:
        """Rename ``staging`` to ``<name>/<version>``; a lost auto-version race takes the next number."""
        name_dir = self.root / name
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            chosen = version or self._next_version(name)
            hub = meta.stored_as(name, chosen, utc_now(), files)
            if self._rename_into_place(staging, hub, name_dir / chosen, explicit=version is not None):
                fsync_dir(name_dir)
                return StoredVersion(name, chosen, name_dir / chosen, hub)
        raise HubError(f"could not publish {name}: too many concurrent publishers, try again")

    @staticmethod
    def _rename_into_place(staging: Path, hub: AdapterMeta, target: Path, explicit: bool) -> bool:
        """Write hub.json and rename; False when the version was taken (or the name folder removed) meanwhile."""
        taken = HubError(f"adapter {Ref(target.parent.name, target.name)} already exists; choose another --version")
        if target.exists():
            if explicit:
                raise taken
            return False
        write_json(staging / HUB_JSON, hub.to_dict())
        fsync_file(staging / HUB_JSON)
        fsync_dir(staging)
        target.parent.mkdir(exist_ok=True)
        try:
            os.rename(staging, target)
        except FileNotFoundError:
            return False  # the name dir was removed concurrently; recreate it
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if explicit:
                raise taken from e
            return False  # lost an auto-version race: take the next number
        return True

    def _next_version(self, name: str) -> str:
        existing = [int(p.name) for p in _visible_dirs(self.root / name) if p.name.isdigit()]
        return str(max(existing, default=0) + 1)

    # ---- reading ----------------------------------------------------------------------

    def list(self) -> list[AdapterSummary]:
        """Every name (sorted) with its usable versions, oldest to newest, and the skipped ones with why."""
        name_dirs = sorted(_visible_dirs(self.root))
        for gone in self._checked.keys() - set(name_dirs):
            del self._checked[gone]
        summaries = (self._summary(name_dir) for name_dir in name_dirs)
        return [summary for summary in summaries if summary is not None]

    def _summary(self, name_dir: Path) -> AdapterSummary | None:
        """One name's versions (None: no folder or nothing in it)."""
        if name_dir.is_symlink():
            reason = f"'{name_dir}' is a symbolic link; the store refuses links"
            return AdapterSummary(name_dir.name, [], [SkippedVersion(name_dir.name, None, reason)])
        versions, skipped = self._versions(name_dir)
        return AdapterSummary(name_dir.name, versions, skipped) if versions or skipped else None

    def show(self, ref: str) -> StoredVersion:
        """``NAME`` (newest usable by created_at) or ``NAME@VERSION``; NotFoundError lists what exists,
        IntegrityError says why a version is skipped. Reads only that name's folder."""
        name, version = Ref.parse(ref)
        summary = self._summary(self.root / name)
        if summary is None:
            known = ", ".join(s.name for s in self.list() if s.versions) or "none"
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}' (available: {known})")
        if version is None:
            if summary.versions:
                return summary.versions[-1]
            reasons = "; ".join(f"{s.ref}: {s.reason}" for s in summary.skipped)
            raise IntegrityError(f"adapter '{name}' has no usable version ({reasons})")
        return _pick_version(summary, version)

    def snapshot(self) -> dict[str, str]:
        """``name@version -> created_at`` (or why it is skipped); poll and diff to spot changes."""
        listing = self.list()
        return {
            **{v.ref: v.created_at or "" for s in listing for v in s.versions},
            **{k.ref: f"skipped: {k.reason}" for s in listing for k in s.skipped},
        }

    def load(self, ref: str, backbone: dict | None = None) -> LoadedAdapter:
        """Verify checksums again (and the backbone fingerprint, if given) and read the tensors."""
        stored = self.show(ref)
        path = Path(stored.path)
        _verify(path, stored.ref, stored.meta)
        return loaded_adapter(stored, backbone, lambda filename: load_file(path / filename, device="cpu"))

    def training_log(self, ref: str) -> tuple[StoredVersion, dict]:
        """The version and its stored `train_log.json`; NotFoundError when it was published without one."""
        stored = self.show(ref)
        return stored, read_training_log(stored, (Path(stored.path) / TRAIN_LOG).read_bytes)

    # ---- changing ---------------------------------------------------------------------

    def remove(self, ref: str) -> builtins.list[str]:
        """Remove ``NAME`` (all versions) or ``NAME@VERSION``; return the removed refs."""
        name, version = Ref.parse(ref)
        name_dir = self.root / name
        target = name_dir if version is None else name_dir / version
        if target.is_symlink() or name_dir.is_symlink():
            raise HubError(f"'{target}' is a symbolic link; the store refuses links (remove it yourself if intended)")
        if not name_dir.is_dir():
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}'")
        if version is not None and not target.is_dir():
            known = ", ".join(p.name for p in _visible_dirs(name_dir)) or "none"
            raise NotFoundError(f"adapter '{name}' has no version '{version}' (versions: {known})")
        versions = [p.name for p in _visible_dirs(name_dir)] if version is None else [version]
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError as e:
            raise NotFoundError(f"'{ref}' was removed concurrently") from e
        shutil.rmtree(trash)
        if version is not None:
            _remove_if_empty(name_dir)
        return sorted(str(Ref(name, v)) for v in versions)

    def update_metrics(self, ref: str, metrics: dict) -> StoredVersion:
        """Merge ``metrics`` into the version's hub.json (not checksummed) by atomic replace."""
        stored = self.show(ref)
        meta = stored.meta.with_metrics(metrics)
        path = Path(stored.path)
        tmp = path / f".{HUB_JSON}.tmp-{uuid.uuid4().hex}"
        try:
            write_json(tmp, meta.to_dict())
            fsync_file(tmp)
            os.replace(tmp, path / HUB_JSON)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredVersion(stored.name, stored.version, stored.path, meta)

    def gc(self, older_than_s: float = STALE_AFTER_S) -> builtins.list[Path]:
        """Remove internal leftovers of killed publishes, removals and metric updates older than `older_than_s`
        (a live publisher's staging folder is younger); return what was removed."""
        cutoff = time.time() - older_than_s
        return [path for path in self._internal_entries() if _remove_if_older(path, cutoff)]

    def _internal_entries(self) -> builtins.list[Path]:
        """Staging and trash folders in the root, metric-update leftovers in version folders."""
        entries = [p for p in self.root.iterdir() if p.name.startswith(INTERNAL_PREFIXES)]
        for name_dir in _visible_dirs(self.root):
            if not name_dir.is_symlink():
                for version_dir in _visible_dirs(name_dir):
                    entries += [p for p in version_dir.iterdir() if p.name.startswith(INTERNAL_PREFIXES)]
        return entries

    # ---- scanning ---------------------------------------------------------------------

    def _versions(self, name_dir: Path) -> tuple[builtins.list[StoredVersion], builtins.list[SkippedVersion]]:
        versions, skipped = [], []
        previous, current = self._checked.get(name_dir, {}), {}
        for version_dir in _visible_dirs(name_dir):
            current[version_dir] = _checked_version(version_dir, previous.get(version_dir))
            result = current[version_dir][1]
            if isinstance(result, StoredVersion):
                versions.append(result)
            else:
                skipped.append(SkippedVersion(name_dir.name, version_dir.name, result))
        self._checked[name_dir] = current  # folders gone are forgotten
        versions.sort(key=lambda v: (v.created_at, version_key(v.version)))
        return versions, sorted(skipped, key=lambda k: version_key(k.version or ""))


def _pick_version(summary: AdapterSummary, version: str) -> StoredVersion:
    """`version` of `summary`'s name: the usable one, else IntegrityError (skipped) or NotFoundError."""
    for stored in summary.versions:
        if stored.version == version:
            return stored
    for skipped in summary.skipped:
        if skipped.version in (version, None):
            raise IntegrityError(f"'{Ref(summary.name, version)}' is skipped: {skipped.reason}")
    known = ", ".join(v.version for v in summary.versions) or "none"
    raise NotFoundError(f"adapter '{summary.name}' has no version '{version}' (versions: {known})")


def _checked_version(version_dir: Path, cached: Checked | None) -> Checked:
    """The validated version, or why it is skipped; `cached` is reused while no file of the folder changed."""
    signature = _folder_signature(version_dir)
    if cached is not None and cached[0] == signature:
        return cached
    try:
        result: StoredVersion | str = _read_version(version_dir)
    except IntegrityError as err:
        result = str(err)
    return signature, result


def _read_version(version_dir: Path) -> StoredVersion:
    ref = str(Ref(version_dir.parent.name, version_dir.name))
    if version_dir.is_symlink():
        raise IntegrityError(f"'{ref}' is a symbolic link; the store refuses links")
    hub_json = version_dir / HUB_JSON
    if not stat.S_ISREG(_lstat_mode(hub_json)):
        raise IntegrityError(f"{HUB_JSON} of '{ref}' is missing or not a regular file")
    try:
        data = json.loads(hub_json.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IntegrityError(f"{HUB_JSON} of '{ref}' is unreadable: {e}") from e
    meta = AdapterMeta.from_dict(data, f"{HUB_JSON} of '{ref}'", stored=True)
    _verify(version_dir, ref, meta)
    return StoredVersion(version_dir.parent.name, version_dir.name, version_dir, meta)


def _verify(path: Path, ref: str, meta: AdapterMeta) -> None:
    """Refuse links, pickle files and any payload file (or recorded training log) missing or whose sha256 differs
    from hub.json."""
    for entry in path.iterdir():
        if entry.is_symlink():
            raise IntegrityError(f"'{ref}' contains the symbolic link {entry.name}; the store refuses links")
        if entry.suffix in PICKLE_SUFFIXES:
            raise IntegrityError(f"'{ref}' contains {entry.name}; refusing pickle files, only safetensors are read")
    for filename in checked_files(meta):
        file = path / filename
        if filename not in meta.files or not stat.S_ISREG(_lstat_mode(file)):
            raise IntegrityError(f"{filename} of '{ref}' is missing")
        if VERIFIED.sha256(file) != meta.files[filename]:  # hashed again only if the file changed
            raise IntegrityError(f"{filename} of '{ref}' is corrupted or modified (sha256 mismatch)")


def _visible_dirs(path: Path) -> list[Path]:
    """Subdirectories (or links to them) that are not internal (``.tmp-*``, ``.trash-*``, other hidden)."""
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (or already gone): nothing to do


def _remove_if_older(path: Path, cutoff: float) -> bool:
    """Remove `path` (a folder or a file) if it was last changed before `cutoff`; whether it was removed."""
    try:
        if path.lstat().st_mtime > cutoff:
            return False
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False  # removed concurrently
    return True


def _lstat_mode(path: Path) -> int:
    """The file type bits without following links (0 when missing)."""
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


def _folder_signature(path: Path) -> tuple:
    """Name, type, size, mtime and inode of every entry: changes whenever a file is replaced or edited."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return tuple((e.name, *_entry_stat(e)) for e in entries)
    except OSError:
        return ()


def _entry_stat(entry: os.DirEntry) -> tuple:
    info = entry.stat(follow_symlinks=False)
    return info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino
