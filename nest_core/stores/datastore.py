"""The persistent span datastore: encoded passages on disk, so no query re-runs the LM on them.

Encoding 40 passages costs seconds on a CPU, more than generating a whole answer, and a
passage's keys never depend on the query. :class:`SpanDatastore` is a :class:`KeyCache`
(see :mod:`nest_core.encoding`) that keeps each :class:`EncodedPassage` in one file, with a
bounded in-memory LRU in front of it.

File layout (no pickle anywhere; tensors are raw little-endian bytes)::

    b"NESTSPAN" | uint32 format version | uint32 header length | JSON header | pad to 64 |
    keys bytes | values bytes (int32) | char_spans bytes (int32)

The JSON header holds the full cache key (model fingerprint, key layer, window, passage hash),
dtypes, shapes and the sha256 of the payload. A file whose header names another key, whose
checksum fails or whose shapes disagree is a *miss* (logged), never read as keys; the encoder
then rebuilds it and the next ``put`` replaces it. Writes go to a temporary file and are
published with :func:`os.replace`, so readers (threads or processes) see either the old or
the new file, never a torn one. The directory is bounded by ``max_disk_bytes``: reads touch a
file's mtime, and the least recently used files are deleted first.

Clear it with :meth:`SpanDatastore.clear`, :func:`clear_cache` or ``nest cache clear``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nest_core.encoding import EncodedPassage, MemoryKeyCache
from nest_core.models import cache_dir

logger = logging.getLogger(__name__)

MAGIC = b"NESTSPAN"
FORMAT_VERSION = 1
SUFFIX = ".span"
DATASTORE_DIRNAME = "nest_spans"  # the directory created next to a vector store
_PREFIX = struct.Struct("<8sII")  # magic, format version, header length
_ALIGN = 64  # payload offset alignment, so tensors can view the buffer directly
_STALE_TMP_SECONDS = 3600.0
_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}


@dataclass
class DatastoreStats:
    """Counters since construction (benchmark material, not a correctness signal)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    invalid: int = 0
    writes: int = 0
    evicted_files: int = 0
    unwritable: int = 0  # puts skipped: the directory is read-only to this process


def default_datastore_dir() -> Path:
    """Where a datastore lives when no vector-store directory is given: ``<cache_dir>/spans``."""
    return cache_dir() / "spans"


def datastore_dir_for(store_path: str | os.PathLike[str]) -> Path:
    """The datastore directory kept next to (inside) a vector store directory."""
    return Path(store_path) / DATASTORE_DIRNAME


class SpanDatastore:
    """A disk-backed, size-bounded :class:`~nest_core.encoding.KeyCache` with an LRU in front.

    ``key_dtype`` converts floating keys on write (float16 halves disk and memory; ``None``
    stores them as given). Thread-safe; several processes may share one directory (each
    bounds the directory when it writes).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 max_disk_bytes: int = 4 * 2**30, memory_bytes: int = 256 * 2**20,
                 key_dtype: torch.dtype | None = torch.float16) -> None:
        if max_disk_bytes <= 0 or memory_bytes < 0:
            msg = (f"max_disk_bytes={max_disk_bytes} must be > 0 and memory_bytes="
                   f"{memory_bytes} must be >= 0")
            raise ValueError(msg)
        if key_dtype is not None and key_dtype not in _DTYPES.values():
            msg = f"key_dtype={key_dtype} is not supported; use one of {sorted(_DTYPES)} or None"
            raise ValueError(msg)
        self.path = Path(path) if path is not None else default_datastore_dir()
        # A read-only store (shared by another user, mounted read-only) is served as is:
        # reads never write, and keys it lacks are kept in memory only.
        with contextlib.suppress(OSError):
            self.path.mkdir(parents=True, exist_ok=True)
        self._warned_unwritable = False
        self.max_disk_bytes = max_disk_bytes
        self.memory_bytes = memory_bytes
        self.key_dtype = key_dtype
        self.stats = DatastoreStats()
        self._memory = MemoryKeyCache(max_bytes=memory_bytes)
        self._lock = threading.Lock()
        self._remove_stale_tmp()
        self._disk_bytes = self.disk_usage()

    @classmethod
    def for_store(cls, store_path: str | os.PathLike[str], **kwargs: Any) -> SpanDatastore:
        """The datastore inside a Chroma or FAISS store directory (:func:`datastore_dir_for`)."""
        return cls(datastore_dir_for(store_path), **kwargs)

    # --- KeyCache protocol -------------------------------------------------------------------
    def get(self, key: str) -> EncodedPassage | None:
        """The encoded passage for ``key``: memory first, then disk; ``None`` on any doubt."""
        if self.memory_bytes:
            hit = self._memory.get(key)
            if hit is not None:
                self._count("memory_hits")
                return hit
        file = self._file(key)
        try:
            data = _read(file)
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as err:  # unreadable (permissions, I/O): encode again, do not fail
            logger.warning("span datastore: cannot read %s (%s); encoding it again",
                           file.name, err)
            self._count("misses")
            return None
        try:
            value = decode_entry(data, key)
        except ValueError as err:
            # Never trust a doubtful file: report a miss; the encoder rebuilds and re-puts it.
            logger.warning("span datastore: ignoring %s (%s); it will be rebuilt", file.name, err)
            self._count("invalid")
            self._count("misses")
            return None
        _touch(file)
        self._count("disk_hits")
        if self.memory_bytes:
            self._memory.put(key, value)
        return value

    def put(self, key: str, value: EncodedPassage) -> None:
        """Store ``value`` under ``key`` atomically, then bound the directory's size."""
        value = self._convert(value)
        data = encode_entry(key, value)
        file = self._file(key)
        if self.memory_bytes:
            self._memory.put(key, value)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=file.parent)
        except OSError as err:  # a read-only store: serve it, keep this key in memory
            self._count("unwritable")
            if not self._warned_unwritable:
                self._warned_unwritable = True
                logger.warning("span datastore %s is not writable (%s): new passage keys are "
                               "kept in memory only", self.path, err)
            return
        try:
            # mkstemp makes 0600 files; a store shared with others gets what the umask allows
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            old = _size_or_zero(file)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self.stats.writes += 1
            self._disk_bytes += len(data) - old
            over = self._disk_bytes > self.max_disk_bytes
        if over:
            self.evict()

    # --- maintenance ---------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return self._file(key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self._entries())

    def __bool__(self) -> bool:
        return True  # an empty store is still a store (``x or default`` must not drop it)

    def disk_usage(self) -> int:
        """Bytes of all entries in the directory (re-scanned: other processes may write)."""
        return sum(_size_or_zero(f) for f in self._entries())

    def evict(self, target_bytes: int | None = None) -> int:
        """Delete least recently used files until at most ``target_bytes`` remain (default:
        90% of ``max_disk_bytes``, so a full store does not scan on every write)."""
        target = int(self.max_disk_bytes * 0.9) if target_bytes is None else target_bytes
        with self._lock:
            files = []
            for f in self._entries():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, st.st_size, f))
            total = sum(size for _, size, _ in files)
            removed = 0
            for _, size, f in sorted(files, key=lambda t: (t[0], t[2].name)):
                if total <= target:
                    break
                f.unlink(missing_ok=True)
                total -= size
                removed += 1
            self._disk_bytes = total
            self.stats.evicted_files += removed
        if removed:
            logger.info("span datastore %s: evicted %d least recently used file(s)",
                        self.path, removed)
        return removed

    def retain(self, keys: set[str]) -> int:
        """Delete every file but those of ``keys`` (the keys a store's passages need under
        the current model): span files of an older model or of deleted passages would
        otherwise stay until the size bound evicts them. For a store's own datastore only,
        never the shared user cache. Returns the number of files removed."""
        keep = {self._file(k) for k in keys}
        removed = 0
        with self._lock:
            for f in self._entries():
                if f not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                        removed += 1
            self._memory = MemoryKeyCache(max_bytes=self.memory_bytes)
            self._disk_bytes = sum(_size_or_zero(f) for f in self._entries())
        return removed

    def clear(self) -> int:
        """Delete every entry (disk and memory); returns the number of files removed."""
        removed = 0
        with self._lock:
            for f in [*self._entries(), *self.path.glob(f"*/.tmp-*{SUFFIX}")]:
                f.unlink(missing_ok=True)
                removed += 1
            for sub in self.path.iterdir():
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            self._memory = MemoryKeyCache(max_bytes=self.memory_bytes)
            self._disk_bytes = 0
        return removed

    # --- internals -----------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.path / digest[:2] / f"{digest[2:40]}{SUFFIX}"

    def _entries(self) -> list[Path]:
        return [f for f in self.path.glob(f"*/*{SUFFIX}") if not f.name.startswith(".tmp-")]

    def _convert(self, value: EncodedPassage) -> EncodedPassage:
        if self.key_dtype is None or value.keys.dtype == self.key_dtype:
            return value
        return EncodedPassage(keys=value.keys.to(self.key_dtype).contiguous(),
                              values=value.values, char_spans=value.char_spans)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _remove_stale_tmp(self) -> None:
        """Temporary files left by a writer that crashed (young ones may be in flight)."""
        now = time.time()
        for f in self.path.glob(f"*/.tmp-*{SUFFIX}"):
            try:
                if now - f.stat().st_mtime > _STALE_TMP_SECONDS:
                    f.unlink(missing_ok=True)
            except OSError:  # gone already, or a read-only store
                continue


def clear_cache(path: str | os.PathLike[str] | None = None) -> int:
    """Delete the span datastore at ``path`` (a datastore directory or a vector-store
    directory that contains one; default :func:`default_datastore_dir`). Returns the number
    of files removed. This is what ``nest cache clear`` runs."""
    target = Path(path) if path is not None else default_datastore_dir()
    if (target / DATASTORE_DIRNAME).is_dir():
        target = target / DATASTORE_DIRNAME
    if not target.exists():
        return 0
    return SpanDatastore(target).clear()


# --- file format -----------------------------------------------------------------------------
def encode_entry(key: str, value: EncodedPassage) -> bytes:
    """Serialise one entry: prefix, JSON header (key, dtypes, shapes, checksum), payload."""
    keys = value.keys.detach().cpu().contiguous()
    dtype_name = _dtype_name(keys.dtype)
    parts = [_tensor_bytes(keys),
             _tensor_bytes(value.values.detach().cpu().to(torch.int32).contiguous()),
             _tensor_bytes(value.char_spans.detach().cpu().to(torch.int32).contiguous())]
    payload = b"".join(parts)
    meta = {"key": key, "keys_dtype": dtype_name, "keys_shape": list(keys.shape),
            "rows": value.num_rows, "payload_bytes": len(payload)}
    header = json.dumps({**meta, "sha256": _digest(meta, payload)},
                        sort_keys=True).encode("utf-8")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    pad = -len(head) % _ALIGN
    return head + b"\0" * pad + payload


def decode_entry(data: bytes | bytearray, expected_key: str) -> EncodedPassage:
    """Parse and verify one entry; any mismatch raises ``ValueError`` (treated as a miss).

    The returned tensors view ``data`` when it is a ``bytearray`` (no copy of the keys).
    """
    buf = data if isinstance(data, bytearray) else bytearray(data)
    if len(data) < _PREFIX.size:
        msg = "truncated file"
        raise ValueError(msg)
    magic, version, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC or version != FORMAT_VERSION:
        msg = f"not a span file of format {FORMAT_VERSION} (magic {magic!r}, version {version})"
        raise ValueError(msg)
    try:
        header = json.loads(bytes(buf[_PREFIX.size:_PREFIX.size + header_len]))
        sha = header.pop("sha256")
        dtype = _DTYPES.get(header["keys_dtype"])
        rows, shape = int(header["rows"]), tuple(int(n) for n in header["keys_shape"])
        payload_bytes = int(header["payload_bytes"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        msg = f"unreadable header: {err!r}"
        raise ValueError(msg) from err
    if header.get("key") != expected_key:
        msg = "header names another cache key (model, layer, window or passage changed)"
        raise ValueError(msg)
    start = _PREFIX.size + header_len
    start += -start % _ALIGN
    payload = memoryview(buf)[start:]
    # The digest covers the header fields too, so an edited header cannot pass as valid.
    if len(payload) != payload_bytes or _digest(header, payload) != sha:
        msg = "checksum mismatch (corrupted or truncated file)"
        raise ValueError(msg)
    if dtype is None or len(shape) != 2 or shape[0] != rows:
        msg = f"bad header shapes/dtype: {header['keys_dtype']} {shape} rows={rows}"
        raise ValueError(msg)
    payload.release()
    n_keys = shape[0] * shape[1]
    if payload_bytes != n_keys * _element_size(dtype) + rows * 12:
        msg = f"payload of {payload_bytes} bytes does not match shapes {shape}"
        raise ValueError(msg)
    keys = _view(buf, dtype, n_keys, start).reshape(shape)
    offset = start + n_keys * keys.element_size()
    values = _view(buf, torch.int32, rows, offset).to(torch.long)
    spans = _view(buf, torch.int32, rows * 2, offset + rows * 4).reshape(rows, 2)
    return EncodedPassage(keys=keys, values=values, char_spans=spans)


def _digest(meta: dict[str, object], payload: bytes | memoryview) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8"))
    h.update(payload)
    return h.hexdigest()


def _view(buf: bytearray, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # view as uint8 keeps bfloat16 (no numpy equivalent) byte-exact
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    msg = f"keys of dtype {dtype} cannot be stored; use one of {sorted(_DTYPES)}"
    raise ValueError(msg)


def _read(path: Path) -> bytearray:
    """The whole file in one writable buffer (tensors view it without another copy)."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        got = fh.readinto(buf)
    return buf if got == size else buf[:got]


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _touch(path: Path) -> None:
    """Mark ``path`` recently used (mtime: atime is unreliable under noatime/relatime); a
    file of a read-only store stays as it is."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _read_umask() -> int:
    """The process umask (read by setting it and restoring it: once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
