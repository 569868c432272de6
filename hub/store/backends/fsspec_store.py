"""The adapter store on any fsspec URL (`s3://bucket/prefix`, `gs://…`, `memory://…`): publishing without rename.

Same layout as the local store, `<root>/<name>/<version>/` with the payload files and `hub.json`, so a local
store copied to a bucket (or back) stays valid. Object stores have no atomic directory rename, so a publish is:

1. claim the version: create `<name>/<version>/.claim` *exclusively* (S3 `If-None-Match: *`, GCS generation 0,
   `open(…, "xb")`); of two publishers of one version exactly one succeeds, the other gets a clear error (or, with
   an automatic version number, takes the next one);
2. upload the payload files;
3. write `hub.json` last: the commit marker. Readers list only versions that have one; a publish that died
   (network, server restart) leaves an uncommitted version that nobody serves and `gc` removes.

Downloaded files are kept in a local cache named by their sha256 and verified against `hub.json` on every use.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
from safetensors.torch import load as load_safetensors

from hub.errors import HubError, IntegrityError, NotFoundError
from hub.store.export import read_export, stage_payload
from hub.store.fileio import json_text, utc_now
from hub.store.format import AdapterMeta
from hub.store.layout import HUB_JSON, MAX_PUBLISH_ATTEMPTS, STALE_AFTER_S, TRAIN_LOG, payload_files
from hub.store.refs import Ref, validate_name, version_key
from hub.store.versions import (
    AdapterSummary, LoadedAdapter, SkippedVersion, StoredVersion, loaded_adapter, read_training_log,
)
from hub.store.verified import VERIFIED

log = logging.getLogger("hub.store.fsspec")

CLAIM = ".claim"
DEFAULT_CACHE = Path(os.environ.get("HUB_CACHE", Path.home() / ".cache" / "gpt2-adapter-hub"))


class FsspecStore:
    """Versioned adapters under one fsspec URL; safe for concurrent publishers and readers (see module doc)."""

    def __init__(self, url: str, cache_dir: Path | None = None, **storage_options):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.cache = BlobCache(cache_dir or DEFAULT_CACHE / "blobs")

    def __str__(self) -> str:
        return self.url

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    # ---- publishing -------------------------------------------------------------------
    def publish(self, run_export: str | Path, name: str | None = None, version: str | None = None) -> StoredVersion:
        """Claim the version, upload its files, then write hub.json (the commit marker)."""
        if version is not None:
            validate_name(version, "version")
        export = read_export(Path(run_export))
        name = validate_name(name if name is not None else export.meta.name)
        with tempfile.TemporaryDirectory() as staging:
            files = stage_payload(export, name, Path(staging))
            chosen = self._claim(name, version)
            hub = export.meta.stored_as(name, chosen, utc_now(), files)
            try:
                for filename in [*payload_files(hub), TRAIN_LOG]:
                    if (Path(staging) / filename).is_file():
                        self.fs.put_file(str(Path(staging) / filename), self._path(name, chosen, filename))
                self.fs.pipe_file(self._path(name, chosen, HUB_JSON), _json_bytes(hub.to_dict()), mode="create")
            except Exception as err:  # any failure of the remote side (network, server, credentials)
                self._abandon(name, chosen)
                raise HubError(f"publishing {Ref(name, chosen)} to {self.url} failed ({err.__class__.__name__}: "
                               f"{err}); the version was not committed, readers ignore it; publish again") from None
        return StoredVersion(name, chosen, self._url(self._path(name, chosen)), hub)

    def _claim(self, name: str, version: str | None) -> str:
        """Create `<name>/<version>/.claim` exclusively; an automatic version takes the next free number."""
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            chosen = version or self._next_version(name)
            try:
                self.fs.pipe_file(self._path(name, chosen, CLAIM), _json_bytes({"at": time.time()}), mode="create")
                return chosen
            except FileExistsError:
                if version is not None:
                    raise HubError(f"adapter {Ref(name, chosen)} already exists or is being published; choose another "
                                   "--version") from None
            except Exception as err:  # noqa: BLE001 - the remote's own errors carry no common type
                raise HubError(f"cannot publish to {self.url}: {err.__class__.__name__}: {err}") from None
        raise HubError(f"could not publish {name}: too many concurrent publishers, try again")

    def _next_version(self, name: str) -> str:
        existing = [int(v) for v in self._children(self._path(name)) if v.isdigit()]
        return str(max(existing, default=0) + 1)

    def _abandon(self, name: str, version: str) -> None:
        """Best effort: remove an uncommitted version (if the server is gone, `gc` does it later)."""
        try:
            self.fs.rm(self._path(name, version), recursive=True)
        except Exception:  # the remote is gone or refuses: leave it to `gc`
            log.warning("could not remove the uncommitted %s@%s; `gc` will", name, version)

    # ---- reading ----------------------------------------------------------------------
    def list(self) -> list[AdapterSummary]:
        """Committed versions (those with hub.json), oldest to newest per name; unreadable ones skipped, with why."""
        return self._summaries("*")

    def _summaries(self, names: str) -> builtins.list[AdapterSummary]:
        """Summaries of the names matching the glob `names` (one name: one short listing)."""
        by_name: dict[str, tuple[list, list]] = {}
        for name, version, data in self._manifests(names):
            versions, skipped = by_name.setdefault(name, ([], []))
            try:
                meta = AdapterMeta.from_dict(json.loads(data), f"{HUB_JSON} of '{Ref(name, version)}'", stored=True)
                versions.append(StoredVersion(name, version, self._url(self._path(name, version)), meta))
            except (ValueError, IntegrityError) as err:
                skipped.append(SkippedVersion(name, version, str(err)))
        return [AdapterSummary(name, sorted(v, key=lambda s: (s.created_at, version_key(s.version))),
                               sorted(k, key=lambda s: version_key(s.version or "")))
                for name, (v, k) in sorted(by_name.items())]

    def _manifests(self, names: str) -> builtins.list[tuple[str, str, bytes]]:
        """(name, version, hub.json bytes) of every committed version of the matching names, fetched together."""
        self.fs.invalidate_cache()
        paths = self.fs.glob(self._path(names, "*", HUB_JSON))
        contents = self.fs.cat(paths) if paths else {}
        found = []
        for path, data in contents.items():
            name, version = self.fs._strip_protocol(path)[len(self.root) + 1:].split("/")[:2]
            if not name.startswith(".") and not version.startswith("."):
                found.append((name, version, data))
        return found

    def show(self, ref: str) -> StoredVersion:
        name, version = Ref.parse(ref)  # a valid name has no glob characters
        summary = next(iter(self._summaries(name)), None)
        if summary is None or not summary.versions:
            known = ", ".join(s.name for s in self.list() if s.versions) or "none"
            raise NotFoundError(f"no adapter named '{name}' in store '{self.url}' (available: {known})")
        if version is None:
            return summary.versions[-1]
        for stored in summary.versions:
            if stored.version == version:
                return stored
        known = ", ".join(v.version for v in summary.versions)
        raise NotFoundError(f"adapter '{name}' has no version '{version}' (versions: {known})")

    def snapshot(self) -> dict[str, str]:
        """`name@version -> ETag/mtime` of every commit marker: one listing, cheap to poll."""
        self.fs.invalidate_cache()
        snapshot = {}
        for path, info in self.fs.glob(self._path("*", "*", HUB_JSON), detail=True).items():
            name, version = self.fs._strip_protocol(path)[len(self.root) + 1:].split("/")[:2]
            snapshot[str(Ref(name, version))] = str(info.get("ETag") or info.get("mtime") or info.get("created"))
        return snapshot

    def load(self, ref: str, backbone: dict | None = None) -> LoadedAdapter:
        """Read the files through the local cache, each verified against hub.json's sha256."""
        stored = self.show(ref)
        blobs = {}
        for filename in payload_files(stored.meta):
            expected = stored.meta.files.get(filename)
            if expected is None:
                raise IntegrityError(f"{filename} of '{stored.ref}' is missing from its {HUB_JSON}")
            blobs[filename] = self.cache.get(expected, lambda f=filename: self.fs.cat_file(
                self._path(stored.name, stored.version, f)), f"{filename} of '{stored.ref}'")
        return loaded_adapter(stored, backbone, lambda filename: load_safetensors(blobs[filename]))

    def training_log(self, ref: str) -> tuple[StoredVersion, dict]:
        """The version and its stored `train_log.json`; NotFoundError when it was published without one."""
        stored = self.show(ref)
        return stored, read_training_log(stored, lambda: self.fs.cat_file(
            self._path(stored.name, stored.version, TRAIN_LOG)))

    # ---- changing ---------------------------------------------------------------------
    def remove(self, ref: str) -> builtins.list[str]:
        """Uncommit first (hub.json), then delete the rest."""
        name, version = Ref.parse(ref)
        removed = [v for s in self.list() if s.name == name for v in s.versions
                   if version is None or v.version == version]
        if not removed:
            raise NotFoundError(f"no adapter '{ref}' in store '{self.url}'")
        for stored in removed:
            path = self._path(stored.name, stored.version)
            self.fs.rm(f"{path}/{HUB_JSON}")
            self.fs.rm(path, recursive=True)
        return sorted(stored.ref for stored in removed)

    def update_metrics(self, ref: str, metrics: dict) -> StoredVersion:
        """Rewrite hub.json with the metrics merged in (one PUT: atomic on object stores)."""
        stored = self.show(ref)
        meta = stored.meta.with_metrics(metrics)
        self.fs.pipe_file(self._path(stored.name, stored.version, HUB_JSON), _json_bytes(meta.to_dict()))
        return StoredVersion(stored.name, stored.version, stored.path, meta)

    def gc(self, older_than_s: float = STALE_AFTER_S) -> builtins.list[str]:
        """Remove uncommitted versions (a claim, no hub.json) older than `older_than_s`."""
        self.fs.invalidate_cache()
        removed = []
        for claim in self.fs.glob(self._path("*", "*", CLAIM)):
            folder = claim.rsplit("/", 1)[0]
            if self.fs.exists(f"{folder}/{HUB_JSON}"):
                continue
            try:
                claimed_at = json.loads(self.fs.cat_file(claim))["at"]
            except (OSError, ValueError, KeyError):
                claimed_at = 0.0
            if time.time() - claimed_at > older_than_s:
                self.fs.rm(folder, recursive=True)
                removed.append(self._url(folder))
        return removed

    def _children(self, path: str) -> builtins.list[str]:
        self.fs.invalidate_cache()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []


class BlobCache:
    """Files by sha256 on local disk; a cached copy is verified before use (`VERIFIED`: hashed again only if it
    changed), a download verified before kept."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, sha256: str, fetch, what: str) -> bytes:
        path = self.folder / sha256
        if path.is_file() and VERIFIED.sha256(path) == sha256:  # re-hashed only if the copy changed since
            return path.read_bytes()
        data = fetch()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{what} is corrupted or modified (sha256 mismatch)")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{sha256}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data


def _json_bytes(data: dict) -> bytes:
    return json_text(data).encode()
