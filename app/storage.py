"""URIs -> pyarrow filesystems: local paths and s3:// (any endpoint), the one storage helper.

Credentials are read by pyarrow/boto3 from the standard AWS environment variables or the instance
profile; they are never passed through configs, logged, or written to MLflow.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Options:
    """Where s3:// URIs point. None falls back to the AWS environment variables, then AWS itself."""

    endpoint: Optional[str] = None
    region: Optional[str] = None
    max_attempts: int = 11  # storage.s3_max_attempts

    @classmethod
    def from_config(cls, cfg) -> "S3Options":
        return cls(endpoint=cfg.storage.s3_endpoint, region=cfg.storage.s3_region,
                   max_attempts=cfg.storage.s3_max_attempts)

    def resolved_endpoint(self) -> Optional[str]:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem whose retry strategy survives pickling. Ray ships filesystems to its read
    tasks and training workers by pickling them, and pyarrow pickles an S3FileSystem without its
    `retry_strategy` (the copy falls back to 3 quick attempts); this one is rebuilt from its options.

    Retries follow the AWS SDK's default strategy: the k-th retry waits 25 ms x 2^k, so 10 attempts wait
    about 26 s in all, 11 about 51 s, 12 about 102 s. Connection failures and 5xx answers are retried;
    answers such as NoSuchKey or AccessDenied are not."""

    def __init__(self, options: "S3Options"):
        kwargs: dict[str, Any] = {"region": options.resolved_region()}
        endpoint = options.resolved_endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=options.max_attempts), **kwargs)
        self.options = options

    def __reduce__(self):
        return RetryingS3FileSystem, (self.options,)


# What pyarrow's S3 client says when the endpoint does not answer, or answers that it cannot serve (the errors
# it retries); a run that still sees one has outlasted storage.s3_max_attempts and Ray Data's own retries.
S3_UNAVAILABLE = re.compile(r"AWS Error (?:NETWORK_CONNECTION|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|SLOW_DOWN|"
                            r"UNKNOWN \(HTTP status 5\d\d\))[^\n]*")


def s3_unavailable(err: BaseException) -> Optional[str]:
    """The line of pyarrow's S3 error that says the endpoint was unreachable, found in `err`, its causes and
    what it carries as text (Ray Train's failure holds the worker's traceback); None when it is not that."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        match = S3_UNAVAILABLE.search(str(err))
        if match:
            return match.group(0).strip()
        err = err.__cause__ or err.__context__
    return None


def s3_filesystem(options: S3Options | None = None) -> pafs.S3FileSystem:
    return RetryingS3FileSystem(options or S3Options())


def resolve(uri: str, options: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it). s3://bucket/key -> ("bucket/key"); local -> absolute path."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(options), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve`: the URI a user can paste into a config."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts]])


def exists(uri: str, options: S3Options | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str, options: S3Options | None = None) -> Any:
    """The JSON document at `uri` (FileNotFoundError when there is none)."""
    fs, path = resolve(uri, options)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(uri: str, data: Any, options: S3Options | None = None) -> None:
    """Write `data` as indented JSON at `uri` (parent folders are created on local disks)."""
    fs, path = resolve(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(data, indent=2).encode("utf-8"))


def list_names(uri: str, options: S3Options | None = None, *, folders: bool = False) -> list[str]:
    """Sorted base names of the files (or, with `folders`, the sub-folders) directly under `uri`; [] when
    it does not exist."""
    fs, path = resolve(uri, options)
    wanted = pafs.FileType.Directory if folders else pafs.FileType.File
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == wanted)


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_files(uri: str, options: S3Options | None = None, extensions: tuple[str, ...] = ()) -> tuple[pafs.FileSystem, list[str]]:
    """Expand a file, folder, prefix or glob (`data/*.txt`, `s3://b/corpus/part-*`) to sorted file paths.

    Hidden files and files with other extensions (when `extensions` is given) are left out.
    Raises FileNotFoundError naming the URI when nothing matches.
    """
    fs, path = resolve(uri, options)
    if _has_glob(path):
        base = path
        while _has_glob(base):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File]
        else:
            raise FileNotFoundError(f"no such file or folder: {uri}")
    files = [f for f in files if not os.path.basename(f).startswith((".", "_"))]
    if extensions:
        files = [f for f in files if f.lower().endswith(extensions)]
    if not files:
        wanted = f" with extension {'/'.join(extensions)}" if extensions else ""
        raise FileNotFoundError(f"no files{wanted} found at {uri}")
    return fs, sorted(files)


def download_dir(uri: str, local_dir: str | os.PathLike, options: S3Options | None = None) -> Path:
    """Copy a (possibly remote) folder to a local folder; local URIs are returned as they are."""
    if not is_s3(uri):
        return Path(resolve(uri)[1])
    fs, path = resolve(uri, options)
    local = Path(local_dir)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def upload_dir(local_dir: str | os.PathLike, uri: str, options: S3Options | None = None) -> str:
    fs, path = resolve(uri, options)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def local_model(value: str, options: S3Options | None = None, only: tuple[str, ...] = ()) -> str:
    """A local folder for a model given by HF id, local path, or s3:// URI (downloaded once per node
    into $PFORMER_MODEL_CACHE, default ~/.cache/pformer/models). HF ids and local paths pass through.
    `only`: download just these children (files or folders) of an s3:// folder, e.g. a checkpoint's
    weights and manifest without its optimiser state.

    The cache entry is keyed by the URI *and* the listing (names, sizes, modification times): an object
    rewritten under the same URI (a run relaunched from scratch) is downloaded again, never served stale."""
    if not is_s3(value):
        return value
    import hashlib

    fs, root = resolve(value, options)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File]
    files = sorted((i.path[len(root):].lstrip("/"), i) for i in infos)
    if only:
        files = [(rel, i) for rel, i in files if rel.split("/", 1)[0] in only]
    if not files:
        raise FileNotFoundError(f"nothing to download at {value}" + (f" (looked for {list(only)})" if only else ""))
    listing = "\n".join(f"{rel}\t{i.size}\t{i.mtime_ns}" for rel, i in files)
    cache = Path(os.environ.get("PFORMER_MODEL_CACHE", Path.home() / ".cache" / "pformer" / "models"))
    prefix = hashlib.sha1("|".join((value, *only)).encode()).hexdigest()[:16]
    target = cache / f"{prefix}-{hashlib.sha1(listing.encode()).hexdigest()[:12]}"
    if not (target / ".complete").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        for rel, info in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(tmp / rel), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in cache.glob(f"{prefix}-*"):  # earlier contents of the same URI
            if stale != target and not stale.name.count(".tmp"):
                shutil.rmtree(stale, ignore_errors=True)
    return str(target)


def looks_local(path: str) -> bool:
    """A local path rather than a Hugging Face id: it starts with `.`, `/` or `~`, exists, or its first
    folder exists (`models/opt` beside a `models/` folder; `facebook/opt-2.7b` is an id)."""
    if path.startswith((".", "/", "~")) or os.path.exists(path):
        return True
    head, sep, _ = path.partition("/")
    return bool(sep) and os.path.isdir(head)
