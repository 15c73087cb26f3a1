"""Where runs live: a local directory or any fsspec URL, behind one small interface.

The writer and the reader never touch paths themselves; they ask a :class:`RunLocation` for JSON sidecars and
for a Zarr store. Local writes are atomic (temporary file + rename), so a reader never sees half a file; on
object stores every PUT is atomic anyway.

>>> import tempfile
>>> root = open_root(tempfile.mkdtemp())
>>> loc = root.run("demo")
>>> loc.write_json("meta.json", {"a": 1})
>>> loc.read_json("meta.json")
{'a': 1}
>>> root.list_run_names()
['demo']
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import stat
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from comgra_callbacks.errors import (
    ConfigError,
    CorruptStoreError,
    MissingDependencyError,
    StoreError,
    missing_extra,
)

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")

MAX_SIDECAR_BYTES = 64 << 20
"""The largest JSON sidecar (``meta.json``, ``manifest.json``, ``graph.json``, ``modules.json``, ``notes.json``)
a reader accepts: 64 MiB, far above what a real run writes (a graph of 10 000 nodes is ~3 MiB)."""
ENDPOINT_TIMEOUT_S = 3.0
"""How long a reader waits for an object store's endpoint to accept a connection before giving up."""


def is_url(root: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` roots other than ``file://``.

    >>> is_url("s3://bucket/x"), is_url("/tmp/x"), is_url("file:///tmp/x")
    (True, False, False)
    """
    text = os.fspath(root)
    return "://" in text and not text.startswith("file://")


def check_run_name(name: str, owner: str = "run_name") -> str:
    """Validate a run name: letters, digits, ``_ . -``; ``/`` separates nested groups (e.g. ranks).

    >>> check_run_name("2026-11-21_ab12")
    '2026-11-21_ab12'
    >>> check_run_name("../x")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `run_name`: expected letters, digits, '_', '.', '-' (and '/' between parts), got '../x'.
    """
    if not isinstance(name, str) or not _RUN_NAME.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise ConfigError(f"`{owner}`: expected letters, digits, '_', '.', '-' (and '/' between parts), got {name!r}.")
    return name


class RunLocation(ABC):
    """One run's place: its JSON sidecars and its Zarr store."""

    name: str

    @property
    @abstractmethod
    def uri(self) -> str:
        """The path or URL of the run, for messages and for ``open_run``."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a file atomically."""

    @abstractmethod
    def delete_bytes(self, key: str) -> None:
        """Delete the file if it exists."""

    @abstractmethod
    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr v3 store rooted at the run."""

    def corrupt(self, key: str, problem: str, hint: str | None = None) -> CorruptStoreError:
        """The error for a damaged file of this run: names the run, the file and what is wrong with it."""
        text = f"run {self.name!r} ({self.uri}): its file {key!r} {problem}"
        return CorruptStoreError(text + (f" HINT: {hint}" if hint else ""))

    def read_json(self, key: str) -> Any:
        """The parsed JSON sidecar, or None when it does not exist.

        Raises:
            CorruptStoreError: the file is larger than :data:`MAX_SIDECAR_BYTES`, not a regular file, a link
                out of the run directory, not UTF-8, not JSON, or nested too deeply.
        """
        data = self.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self.corrupt(key, f"is not UTF-8 text ({exc}).", "restore the file from a backup, or delete the run.") from None
        except json.JSONDecodeError as exc:
            raise self.corrupt(key, f"is not valid JSON: {exc}.", "restore the file from a backup, or delete the run.") from None
        except RecursionError:
            raise self.corrupt(key, "is nested too deeply to be a comgra sidecar.", "restore the file from a backup, or delete the run.") from None

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, allow_nan=True, separators=(",", ":")).encode("utf-8"))


class Root(ABC):
    """A directory or URL prefix holding runs."""

    @property
    @abstractmethod
    def uri(self) -> str: ...

    @abstractmethod
    def run(self, name: str) -> RunLocation: ...

    @abstractmethod
    def list_run_names(self) -> list[str]:
        """Names of the runs directly under the root and one level below (rank groups), sorted."""

    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def ensure_writable(self) -> None:
        """Create the root if needed; raise StoreError naming the problem when it cannot be written."""


# --------------------------------------------------------------------------------------------- local


class LocalRunLocation(RunLocation):
    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._dirs: set[str] = set()  # directories this location made or found: a chunk's write skips mkdir
        # temporary names: one random token per location, the process id (a fork shares the token), then a
        # counter: a uuid4 per file read the system's random source ~56 times a commit
        self._token = uuid.uuid4().hex[:16]
        self._count = itertools.count()

    @property
    def uri(self) -> str:
        return str(self.path)

    def read_bytes(self, key: str) -> bytes | None:
        return read_local(self, key, MAX_SIDECAR_BYTES)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the file ``key`` atomically: a temporary file beside it, renamed over it. Plain string paths:
        a commit writes ~56 files, and pathlib's objects cost more than the rename."""
        target = os.path.join(self.path, key)
        parent, name = os.path.split(target)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        tmp = os.path.join(parent, f".{name}.{self._token}-{os.getpid()}-{next(self._count)}.partial")
        try:
            handle = open(tmp, "wb")
        except FileNotFoundError:  # its directory was removed since: made again
            os.makedirs(parent, exist_ok=True)
            handle = open(tmp, "wb")
        try:
            with handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete_bytes(self, key: str) -> None:
        """Delete the file if it exists (the writer's empty chunks: store/chunks.py)."""
        try:
            os.unlink(self.path / key)
        except FileNotFoundError:
            pass

    def zarr_store(self, *, read_only: bool) -> Any:
        if read_only:
            return _safe_local_store()(self.path, read_only=True)
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=read_only)


_SAFE_STORE: Any = None


def _safe_local_store() -> Any:
    """zarr's ``LocalStore`` for readers, with every read going through :func:`read_local`'s checks (a chunk
    linked out of the run, or a chunk that is ``/dev/zero`` or a FIFO, is refused instead of read forever).
    Built on first use so that importing this module does not import zarr."""
    global _SAFE_STORE
    if _SAFE_STORE is not None:
        return _SAFE_STORE
    import asyncio
    import io

    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer.core import default_buffer_prototype
    from zarr.storage import LocalStore

    def get(root: Path, key: str, prototype: Any, byte_range: Any) -> Any:
        location = LocalRunLocation(root, root.name)
        data = read_local(location, key, None) if byte_range is None else None
        if byte_range is None:
            return None if data is None else prototype.buffer.from_bytes(data)
        if read_local_check(location, key) is None:
            return None
        with open(root / key, "rb") as handle:
            size = handle.seek(0, io.SEEK_END)
            if isinstance(byte_range, RangeByteRequest):
                handle.seek(byte_range.start)
                return prototype.buffer.from_bytes(handle.read(byte_range.end - byte_range.start))
            if isinstance(byte_range, OffsetByteRequest):
                handle.seek(byte_range.offset)
            elif isinstance(byte_range, SuffixByteRequest):
                handle.seek(max(0, size - byte_range.suffix))
            else:
                raise TypeError(f"unexpected byte range {byte_range!r}")
            return prototype.buffer.from_bytes(handle.read())

    class SafeLocalStore(LocalStore):
        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            if not self._is_open:
                await self._open()
            return await asyncio.to_thread(get, self.root, key, prototype or default_buffer_prototype(), byte_range)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    _SAFE_STORE = SafeLocalStore
    return SafeLocalStore


def read_local_check(location: LocalRunLocation, key: str) -> os.stat_result | None:
    """The checks of :func:`read_local` without reading: None when missing, else the file's status."""
    path = location.path / key
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    base = os.path.realpath(location.path)
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise location.corrupt(
            key, f"is a link to {real!r}, outside the run directory; a reader never follows it.",
            "copy the file into the run directory instead of linking it.",
        )
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise location.corrupt(key, f"is a link to {real!r}, which does not exist.") from None
    if not stat.S_ISREG(info.st_mode):
        raise location.corrupt(key, f"is not a regular file (mode {stat.filemode(info.st_mode)!r}); a reader only reads regular files.")
    return info


def read_local(location: LocalRunLocation, key: str, limit: int | None) -> bytes | None:
    """Read ``key`` of a local run safely: None when missing; never through a link that leaves the run
    directory, never from anything but a regular file (a FIFO would block, ``/dev/zero`` never ends), and
    never more than ``limit`` bytes.

    Raises:
        CorruptStoreError: the file is one of those (the message names the run and the file).
    """
    if read_local_check(location, key) is None:
        return None
    real = os.path.realpath(location.path / key)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise location.corrupt(key, f"is a link to {real!r}, which does not exist.") from None
    except OSError as exc:
        raise location.corrupt(key, f"cannot be opened: {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise location.corrupt(key, f"is not a regular file (mode {stat.filemode(info.st_mode)!r}); a reader only reads regular files.")
        if limit is not None and info.st_size > limit:
            raise location.corrupt(
                key, f"has {info.st_size:,} bytes; a comgra sidecar has at most {limit:,} (MAX_SIDECAR_BYTES).",
                "this is not a file comgra_callbacks wrote: restore it from a backup, or delete the run.",
            )
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise location.corrupt(key, f"has more than {limit:,} bytes; a comgra sidecar has at most {limit:,} (MAX_SIDECAR_BYTES).")
    return data


class LocalRoot(Root):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        if text.startswith("file://"):
            text = text[len("file://") :]
        self.path = Path(text).expanduser()

    @property
    def uri(self) -> str:
        return str(self.path)

    def run(self, name: str) -> LocalRunLocation:
        return LocalRunLocation(self.path / name, name)

    def exists(self) -> bool:
        return self.path.is_dir()

    def list_run_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        names = []
        for child in sorted(self.path.iterdir()):
            if not child.is_dir():
                continue
            if os.path.lexists(child / "meta.json"):  # whatever it is: a damaged one is reported, not hidden
                names.append(child.name)
            try:
                grandchildren = sorted(child.iterdir())
            except OSError:  # a directory we may not list is no run of ours; the others are
                continue
            for grandchild in grandchildren:
                if grandchild.is_dir() and os.path.lexists(grandchild / "meta.json"):
                    names.append(f"{child.name}/{grandchild.name}")
        return names

    def ensure_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store root {str(self.path)!r}: {exc}") from exc
        if not os.access(self.path, os.W_OK):
            raise StoreError(f"the store root {str(self.path)!r} is not writable. HINT: choose another `root`.")


# -------------------------------------------------------------------------------------------- fsspec


class FsspecRunLocation(RunLocation):
    def __init__(self, root: FsspecRoot, name: str) -> None:
        self.root = root
        self.name = name
        self.path = f"{root.path.rstrip('/')}/{name}"

    @property
    def uri(self) -> str:
        return f"{self.root.uri.rstrip('/')}/{self.name}"

    def read_bytes(self, key: str) -> bytes | None:
        self.root.check_reachable()
        try:
            data = bytes(self.root.fs.cat_file(f"{self.path}/{key}", start=0, end=MAX_SIDECAR_BYTES + 1))
        except FileNotFoundError:
            return None
        if len(data) > MAX_SIDECAR_BYTES:
            raise self.corrupt(key, f"has more than {MAX_SIDECAR_BYTES:,} bytes; a comgra sidecar has at most {MAX_SIDECAR_BYTES:,} (MAX_SIDECAR_BYTES).")
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        self.root.fs.pipe_file(f"{self.path}/{key}", data)

    def delete_bytes(self, key: str) -> None:
        try:
            self.root.fs.rm_file(f"{self.path}/{key}")
        except FileNotFoundError:
            pass

    def zarr_store(self, *, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.uri, storage_options=self.root.storage_options, read_only=read_only)


class FsspecRoot(Root):
    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a hard dependency
            raise missing_extra("fsspec", "s3", "a remote store") from exc
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        scheme = url.split("://", 1)[0]
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **self.storage_options)
        except ImportError as exc:
            if scheme in ("s3", "s3a"):
                raise missing_extra("s3fs", "s3", f"the store root {url!r}") from exc
            package = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
            hint = f"pip install {package}" if package else f"install the fsspec driver for {scheme}://"
            raise MissingDependencyError(
                f"the store root {url!r} needs the fsspec driver for {scheme}:// ({exc}). HINT: {hint}"
            ) from exc
        except ValueError as exc:
            raise ConfigError(f"`root`: cannot open the URL {url!r}: {exc}") from exc
        self._reachable = False

    @property
    def uri(self) -> str:
        return self.url

    def check_reachable(self) -> None:
        """Fail fast when the configured endpoint (``storage_options["endpoint_url"]``) accepts no connection.

        Without this, an unreachable endpoint looks like an empty bucket only after the client's retries
        (~14 s with s3fs). Checked once per root; roots without an ``endpoint_url`` are not probed.

        Raises:
            StoreError: nothing answers at the endpoint's host and port.
        """
        if self._reachable:
            return
        endpoint = self.storage_options.get("endpoint_url") or (self.storage_options.get("client_kwargs") or {}).get("endpoint_url")
        if endpoint:
            parts = urlsplit(str(endpoint))
            port = parts.port or (443 if parts.scheme == "https" else 80)
            if parts.hostname:
                try:
                    socket.create_connection((parts.hostname, port), timeout=ENDPOINT_TIMEOUT_S).close()
                except OSError as exc:
                    raise StoreError(
                        f"`storage_options['endpoint_url']`: the endpoint {endpoint!r} of the store root {self.url!r} "
                        f"could not be reached ({exc.strerror or exc}). HINT: check that the object store is running "
                        f"and that the endpoint's host and port are right."
                    ) from None
        self._reachable = True

    def run(self, name: str) -> FsspecRunLocation:
        return FsspecRunLocation(self, name)

    def exists(self) -> bool:
        self.check_reachable()
        try:
            self.fs.invalidate_cache()
            return bool(self.fs.exists(self.path))
        except Exception:
            return False

    def list_run_names(self) -> list[str]:
        self.check_reachable()
        self.fs.invalidate_cache()
        try:
            metas = self.fs.glob(f"{self.path}/*/meta.json") + self.fs.glob(f"{self.path}/*/*/meta.json")
        except FileNotFoundError:
            return []
        prefix = self.path.rstrip("/") + "/"
        return sorted(m[len(prefix) : -len("/meta.json")] for m in metas if m.startswith(prefix))

    def ensure_writable(self) -> None:
        probe = f"{self.path}/.comgra-write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:
            bucket = self.path.split("/", 1)[0]
            raise StoreError(
                f"cannot write to the store root {self.url!r}: {type(exc).__name__}: {exc}. "
                f"HINT: check that the bucket {bucket!r} exists, the credentials and `storage_options` "
                f"(endpoint_url, key, secret) are right."
            ) from exc


def open_root(root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Root:
    """Open a root of runs: a local path, ``file://`` path, or an fsspec URL (``s3://bucket/prefix``)."""
    if not isinstance(root, (str, os.PathLike)):
        raise ConfigError(f"`root`: expected a path or URL string, got {root!r} of type {type(root).__name__}.")
    if is_url(root):
        return FsspecRoot(os.fspath(root), storage_options)
    if storage_options:
        raise ConfigError(
            f"`storage_options`: only used with a URL root such as 's3://bucket/prefix', but root is the local "
            f"path {os.fspath(root)!r}."
        )
    return LocalRoot(root)


def split_run_uri(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a run's path or URL into (root, run name); the name is the last path component.

    >>> split_run_uri("s3://b/runs/r1")
    ('s3://b/runs', 'r1')
    """
    text = os.fspath(uri).rstrip("/")
    head, _, tail = text.rpartition("/")
    if not tail:
        raise ConfigError(f"`path`: expected the path or URL of a run, got {os.fspath(uri)!r}.")
    return (head or ".", tail)
