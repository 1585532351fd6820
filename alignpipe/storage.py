"""Where everything a Ray worker reads or writes lives: a local folder, or `s3://bucket/prefix` on any S3 store.

An artifact (a model folder, an adapter, a data file, a prediction file) is named by a URI: a plain absolute path on
local storage, or `s3://bucket/key` in object storage. Stage outputs sit under content-keyed folders, so what a URI
names never changes once published: a node that downloaded it once keeps the copy. A worker asks `fetch` for a
local copy and `publish`es what it made; the driver never hands a worker a path only the driver can see.

Endpoint and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) or `compute.storage_endpoint`: each node reads its own, so no
secret travels with the work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from alignpipe.errors import ConfigError

S3 = "s3://"
COMPLETE = ".complete"  # object beside a published folder, written last: its presence means the folder is whole


class Storage(BaseModel):
    """The storage root of a pipeline (`compute.storage_path`, default its workdir). Crosses the Ray boundary."""

    root: str
    endpoint: str | None = None

    @classmethod
    def for_compute(cls, compute, workdir: str) -> Storage:
        """The storage of a pipeline's `compute` section (`storage_path`, `storage_endpoint`)."""
        return cls.of(compute.storage_path, workdir, compute.storage_endpoint)

    @classmethod
    def of(cls, storage_path: str | None, workdir: str, endpoint: str | None = None) -> Storage:
        root = storage_path or workdir
        if not root.startswith(S3):
            if "://" in root:
                raise ConfigError(f"compute.storage_path={root!r}: use a local folder or s3://bucket/prefix")
            root = str(Path(root).expanduser().resolve())
        elif not root[len(S3):].strip("/"):
            raise ConfigError(f"compute.storage_path={root!r}: name the bucket, e.g. s3://my-bucket/alignpipe")
        return cls(root=root.rstrip("/"), endpoint=endpoint)

    @property
    def remote(self) -> bool:
        return self.root.startswith(S3)

    def uri(self, *parts: str) -> str:
        """The URI of `parts` under the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts)]) if self.remote else str(Path(self.root, *parts))

    def ray_storage(self):
        """`(storage_path, storage_filesystem)` for Ray Train's RunConfig: its runs go under `<root>/ray_results`.
        A custom endpoint needs an explicit filesystem, and then a path without the `s3://` scheme."""
        if not self.remote:
            path = Path(self.root) / "ray_results"
            path.mkdir(parents=True, exist_ok=True)
            return str(path), None
        return _key(self.uri("ray_results")), self.filesystem()

    def filesystem(self):
        """A pyarrow S3 filesystem for this store (credentials from the environment of the process using it)."""
        from pyarrow import fs

        endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return fs.S3FileSystem(endpoint_override=endpoint, region=region)

    # --- reading ----------------------------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        """True when `uri` names a whole, published file or folder."""
        if not uri.startswith(S3):
            return Path(uri).exists()
        from pyarrow import fs

        s3 = self.filesystem()
        if s3.get_file_info(_key(uri) + COMPLETE).type == fs.FileType.File:
            return True
        return s3.get_file_info(_key(uri)).type == fs.FileType.File

    def fetch(self, uri: str, cache: str | Path | None = None) -> str:
        """A local copy of `uri` (file or folder): the path itself on local storage (or a hub id, unchanged), else
        downloaded once into `cache` (default: a folder in this node's temp dir) and kept there."""
        if not uri.startswith(S3):
            return uri
        from pyarrow import fs

        local = Path(cache or Path(tempfile.gettempdir()) / "alignpipe-storage")
        local = local / hashlib.sha256(uri.encode()).hexdigest()[:16] / uri.rstrip("/").rsplit("/", 1)[-1]
        if local.exists():
            return str(local)
        s3 = self.filesystem()
        is_dir = s3.get_file_info(_key(uri) + COMPLETE).type == fs.FileType.File
        if not is_dir and s3.get_file_info(_key(uri)).type != fs.FileType.File:
            raise FileNotFoundError(f"{uri}: not in object storage (or not completely written)")
        partial = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_mkdir(local.parent))) / local.name
        if is_dir:
            partial.mkdir()  # pyarrow makes the subfolders it lists, not the destination itself
        fs.copy_files(_key(uri), str(partial), source_filesystem=s3, destination_filesystem=fs.LocalFileSystem())
        try:
            partial.rename(local)
        except OSError:  # another process on this node fetched it first
            pass
        shutil.rmtree(partial.parent, ignore_errors=True)
        return str(local)

    def read_text(self, uri: str) -> str:
        if not uri.startswith(S3):
            return Path(uri).read_text()
        with self.filesystem().open_input_stream(_key(uri)) as f:
            return f.read().decode()

    # --- writing ----------------------------------------------------------------------------------------------

    def publish(self, local: str | Path, uri: str) -> str:
        """Put a local file or folder at `uri` (replacing what is there) and return `uri`. A folder appears whole
        or not at all: locally it is renamed into place; in object storage its COMPLETE marker is written last."""
        local = Path(local)
        if not uri.startswith(S3):
            target = Path(uri)
            if target.resolve() == local.resolve():
                return uri
            partial = target.with_name(target.name + ".partial")
            _remove(partial)
            _mkdir(target.parent)
            (shutil.copytree if local.is_dir() else shutil.copyfile)(local, partial)
            _remove(target)
            partial.rename(target)
            return uri
        from pyarrow import fs

        s3 = self.filesystem()
        key = _key(uri)
        if local.is_dir():  # replace, not merge: no file of an earlier copy survives beside the new ones
            if s3.get_file_info(key + COMPLETE).type == fs.FileType.File:
                s3.delete_file(key + COMPLETE)
            s3.delete_dir_contents(key, missing_dir_ok=True)
        fs.copy_files(str(local), key, source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3)
        if local.is_dir():
            with s3.open_output_stream(key + COMPLETE) as f:
                f.write(b"")
        return uri

    def write_text(self, uri: str, text: str) -> str:
        if not uri.startswith(S3):
            _mkdir(Path(uri).parent)
            Path(uri).write_text(text)
            return uri
        with self.filesystem().open_output_stream(_key(uri)) as f:
            f.write(text.encode())
        return uri


def join(uri: str, *parts: str) -> str:
    """`parts` under the folder `uri` (a local path or an s3:// URI)."""
    return "/".join([uri.rstrip("/"), *parts]) if uri.startswith(S3) else str(Path(uri, *parts))


def _key(uri: str) -> str:
    """`s3://bucket/key` -> `bucket/key`, the path pyarrow's S3 filesystem takes."""
    return uri[len(S3):].rstrip("/")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
