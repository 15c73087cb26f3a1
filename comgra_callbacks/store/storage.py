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

import json
import os
import re
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from comgra_callbacks.errors import ConfigError, MissingDependencyError, StoreError, missing_extra

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


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
    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr v3 store rooted at the run."""

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        if data is None:
            return None
        return json.loads(data.decode("utf-8"))

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

    @property
    def uri(self) -> str:
        return str(self.path)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def zarr_store(self, *, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=read_only)


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
            if (child / "meta.json").is_file():
                names.append(child.name)
            for grandchild in sorted(child.iterdir()):
                if grandchild.is_dir() and (grandchild / "meta.json").is_file():
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
        try:
            return bytes(self.root.fs.cat_file(f"{self.path}/{key}"))
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.root.fs.pipe_file(f"{self.path}/{key}", data)

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

    @property
    def uri(self) -> str:
        return self.url

    def run(self, name: str) -> FsspecRunLocation:
        return FsspecRunLocation(self, name)

    def exists(self) -> bool:
        try:
            self.fs.invalidate_cache()
            return bool(self.fs.exists(self.path))
        except Exception:
            return False

    def list_run_names(self) -> list[str]:
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
