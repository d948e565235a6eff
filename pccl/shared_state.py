"""Shared state: named tensors kept bit-identical across the peers of a group.

A :class:`SharedState` *references* the user's tensors (model parameters, optimizer
moments...) and a revision number; a sync (``Communicator.sync_shared_state``) writes
into those tensors in place, never replacing them. If the user rebinds a parameter
(``p.data = ...``) the state keeps the old tensor: build the state again.

Content hash (``docs/protocol.md`` "Shared state: content hash"). An entry's hash is
XXH3-128 over its raw bytes (the tensor's storage in row-major order, native byte
order). Entries larger than :data:`HASH_CHUNK` bytes are hashed as a two-level tree so
their chunks can be hashed in parallel threads (python-xxhash releases the GIL):
``XXH3-128(u64le(nbytes) || XXH3-128(chunk_0) || XXH3-128(chunk_1) || ...)`` with
chunks of exactly ``HASH_CHUNK`` bytes (the last one shorter). The chunking depends only
on the size, never on the thread count, so every peer computes the same digest. dtype,
shape and byte size are not in the digest: they are compared separately by the master
(:mod:`pccl.election`) so that a mismatch names the key and what differs.

Checkpoints: :meth:`SharedState.save` writes one file atomically (temp file in the same
directory, fsync, ``os.replace``, fsync of the directory); :meth:`SharedState.load`
reads it back, into an existing state in place if asked. File layout: 8-byte magic,
u32le header length, msgpack header ``{"version", "revision", "entries": [[name,
dtype, shape, nbytes, allow_content_inequality, hash], ...]}``, then each entry's
bytes in header order, each starting at a multiple of 64.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, Mapping, Sequence, Union

import msgpack
import torch
import xxhash

from pccl.election import ENFORCE_POPULAR, RECEIVE_ONLY, SEND_ONLY, EntryMeta
from pccl.errors import InvalidUsageError, SharedStateError

HASH_CHUNK = 16 << 20  # bytes per leaf of the hash tree; 16 MiB measured best on 2 threads
_PARALLEL_MIN_BYTES = 2 * HASH_CHUNK  # below this, thread start-up costs more than it saves
MAX_REVISION = 2**64 - 1

FILE_MAGIC = b"PCCLSS\x00\x01"
FILE_VERSION = 1
_FILE_ALIGN = 64
_HEADER_LEN = struct.Struct("<I")
_MAX_FILE_HEADER = 256 << 20

# Dtypes a shared state may hold; anything with a fixed byte width that is not quantized.
SUPPORTED_DTYPES: Mapping[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}


class SyncStrategy(enum.Enum):
    """How a peer takes part in a shared-state sync (PCCL's three strategies).

    ``ENFORCE_POPULAR``: the group's most popular content is distributed to every peer;
    all peers of the group must use it in the same sync. ``RECEIVE_ONLY``: this peer's
    content never counts and it never sends; it is overwritten with the elected content.
    ``SEND_ONLY``: this peer declares its content correct and never receives; if its
    content is not the elected one, the master kicks it.
    """

    ENFORCE_POPULAR = ENFORCE_POPULAR
    RECEIVE_ONLY = RECEIVE_ONLY
    SEND_ONLY = SEND_ONLY


@dataclass(frozen=True)
class SyncInfo:
    """What one sync moved: bytes this peer sent and received, and the revision it now holds."""

    tx_bytes: int
    rx_bytes: int
    revision: int


@dataclass(frozen=True)
class TensorInfo:
    """One named entry of a shared state (the tensor is referenced, not copied).

    ``allow_content_inequality``: peers at the current revision may hold different
    content for this entry (e.g. a per-peer RNG state); only peers with no valid content
    of their own (outdated or ``RECEIVE_ONLY``) fetch it.
    """

    name: str
    tensor: torch.Tensor
    allow_content_inequality: bool = False


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`. Raises ``SharedStateError`` for an unsupported name."""
    try:
        return SUPPORTED_DTYPES[name]
    except KeyError:
        raise SharedStateError(f"unsupported shared-state dtype {name!r}") from None


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable 1-D byte view of a contiguous CPU tensor's storage (zero-copy)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


def _chunks(buf: memoryview) -> list[memoryview]:
    return [buf[i : i + HASH_CHUNK] for i in range(0, len(buf), HASH_CHUNK)]


def _combine(nbytes: int, leaves: Sequence[bytes]) -> bytes:
    return xxhash.xxh3_128_digest(struct.pack("<Q", nbytes) + b"".join(leaves))


def hash_bytes(buf: memoryview | bytes) -> bytes:
    """The 16-byte content hash of one entry's raw bytes, in the calling thread."""
    view = memoryview(buf).cast("B")
    if len(view) <= HASH_CHUNK:
        return xxhash.xxh3_128_digest(view)
    return _combine(len(view), [xxhash.xxh3_128_digest(c) for c in _chunks(view)])


def hash_buffers(buffers: Mapping[str, memoryview], threads: int = 1) -> dict[str, bytes]:
    """Content hashes of several entries, leaves spread over ``threads`` threads.

    The digests are exactly :func:`hash_bytes`'s; threads only change the speed.
    """
    views = {k: memoryview(b).cast("B") for k, b in buffers.items()}
    total = sum(len(v) for v in views.values())
    if threads <= 1 or total < _PARALLEL_MIN_BYTES:
        return {k: hash_bytes(v) for k, v in views.items()}
    jobs = [(k, c) for k, v in views.items() for c in (_chunks(v) if len(v) > HASH_CHUNK else [v])]
    # One batch per thread, balanced by bytes (largest leaves first, each to the lightest
    # batch): per-leaf pool round trips cost more than hashing a 1 MiB leaf.
    batches: list[list[int]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1])):
        lightest = loads.index(min(loads))
        batches[lightest].append(i)
        loads[lightest] += len(jobs[i][1])

    def run(batch: list[int]) -> list[tuple[int, bytes]]:
        return [(i, xxhash.xxh3_128_digest(jobs[i][1])) for i in batch]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pccl-hash") as pool:
        digests = dict(pair for done in pool.map(run, batches) for pair in done)
    leaves: dict[str, list[bytes]] = {k: [] for k in views}
    for i, (key, _) in enumerate(jobs):
        leaves[key].append(digests[i])
    return {
        k: (_combine(len(v), leaves[k]) if len(v) > HASH_CHUNK else leaves[k][0]) for k, v in views.items()
    }


def _check_tensor(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(name, str) or not name:
        raise InvalidUsageError(f"shared-state keys must be non-empty strings, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise InvalidUsageError(f"shared-state entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.layout != torch.strided or not tensor.is_contiguous():
        raise InvalidUsageError(
            f"shared-state entry {name!r} must be a dense contiguous tensor: the sync writes its "
            "storage in place (call .contiguous() once and keep using that tensor)"
        )
    if tensor.device.type not in ("cpu", "cuda"):
        raise InvalidUsageError(f"shared-state entry {name!r} is on {tensor.device}; only cpu and cuda are supported")
    if dtype_name(tensor.dtype) not in SUPPORTED_DTYPES:
        raise InvalidUsageError(f"shared-state entry {name!r} has unsupported dtype {tensor.dtype}")
    return tensor


def _check_revision(revision: object) -> int:
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 <= revision <= MAX_REVISION:
        raise InvalidUsageError(f"revision must be an int in [0, 2**64), got {revision!r}")
    return revision


def _check_no_overlap(entries: Mapping[str, TensorInfo]) -> None:
    """Two entries sharing memory would be written twice by one sync: refuse."""
    spans = sorted(
        (t.device, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
        for name, info in entries.items()
        if (t := info.tensor).numel() > 0
    )
    for (dev_a, _, end_a, name_a), (dev_b, start_b, _, name_b) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise InvalidUsageError(f"shared-state entries {name_a!r} and {name_b!r} share memory")


TensorsArg = Union[Mapping[str, torch.Tensor], Iterable[TensorInfo]]


class SharedState:
    """Named tensors plus a revision, synchronised bit for bit across a peer group.

    ``tensors`` is a mapping name -> tensor or an iterable of :class:`TensorInfo`;
    ``allow_content_inequality`` names entries (of a mapping) that may differ between
    peers. Tensors must be dense and contiguous, on CPU or CUDA (staged through host
    buffers), and must not overlap.

    Raises ``InvalidUsageError`` for a bad key, tensor, dtype, revision, duplicate or
    unknown name.
    """

    def __init__(self, tensors: TensorsArg, revision: int = 0, allow_content_inequality: Iterable[str] = ()) -> None:
        infos = (
            [TensorInfo(k, t) for k, t in tensors.items()] if isinstance(tensors, Mapping) else list(tensors)
        )
        tolerant = set(allow_content_inequality)
        entries: dict[str, TensorInfo] = {}
        for info in infos:
            if not isinstance(info, TensorInfo):
                raise InvalidUsageError(f"expected TensorInfo entries, got {type(info).__name__}")
            _check_tensor(info.name, info.tensor)
            if info.name in entries:
                raise InvalidUsageError(f"duplicate shared-state key {info.name!r}")
            flag = info.allow_content_inequality or info.name in tolerant
            entries[info.name] = TensorInfo(info.name, info.tensor, flag)
        unknown = sorted(tolerant - set(entries))
        if unknown:
            raise InvalidUsageError(f"allow_content_inequality names unknown keys {unknown}")
        _check_no_overlap(entries)
        self._entries = entries
        self._revision = _check_revision(revision)
        self._staging: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ mapping-ish access

    @property
    def revision(self) -> int:
        """The revision this state holds; set it to ``last + 1`` before each sync."""
        return self._revision

    @revision.setter
    def revision(self, value: int) -> None:
        self._revision = _check_revision(value)

    @property
    def entries(self) -> Mapping[str, TensorInfo]:
        """The entries by name (read-only view)."""
        return dict(self._entries)

    def keys(self) -> list[str]:
        """Entry names, in the order given."""
        return list(self._entries)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key].tensor

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Total size of all entries in bytes."""
        return sum(_nbytes(i.tensor) for i in self._entries.values())

    def __repr__(self) -> str:
        return f"SharedState(keys={self.keys()}, revision={self._revision}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ host buffers

    def host_buffer(self, key: str) -> memoryview:
        """A writable byte view of ``key``'s content in host memory.

        CPU tensors: their own storage. CUDA tensors: a pinned staging buffer (kept for
        reuse) holding a fresh copy of the device content; write it back with
        :meth:`commit_host_buffer`.
        """
        tensor = self._entries[key].tensor
        if tensor.device.type == "cpu":
            return byte_view(tensor)
        staging = self._staging_for(key)
        staging.copy_(tensor.detach().reshape(-1).view(torch.uint8))
        return byte_view(staging)

    def receive_buffer(self, key: str) -> memoryview:
        """Where received bytes for ``key`` go: the storage itself, or the staging buffer."""
        tensor = self._entries[key].tensor
        if tensor.device.type == "cpu":
            return byte_view(tensor)
        return byte_view(self._staging_for(key))

    def commit_host_buffer(self, key: str) -> None:
        """Copy a CUDA entry's staging buffer to the device (no-op for CPU entries)."""
        tensor = self._entries[key].tensor
        if tensor.device.type != "cpu":
            tensor.detach().reshape(-1).view(torch.uint8).copy_(self._staging_for(key))

    def release_staging(self) -> None:
        """Free the pinned host buffers kept for CUDA entries."""
        self._staging.clear()

    def _staging_for(self, key: str) -> torch.Tensor:
        buf = self._staging.get(key)
        tensor = self._entries[key].tensor
        if buf is None or buf.numel() != _nbytes(tensor):
            buf = torch.empty(_nbytes(tensor), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self._staging[key] = buf
        return buf

    # ------------------------------------------------------------------ hashing

    def hashes(self, threads: int | None = None) -> dict[str, bytes]:
        """The content hash of every entry (see the module docstring for the definition).

        ``threads`` defaults to ``torch.get_num_threads()``, the user's own budget.
        """
        n = torch.get_num_threads() if threads is None else max(1, threads)
        return hash_buffers({k: self.host_buffer(k) for k in self._entries}, threads=n)

    def metas(self, threads: int | None = None) -> dict[str, EntryMeta]:
        """What the master needs to elect: hash, dtype, shape, size and flag per entry."""
        digests = self.hashes(threads)
        return {k: _meta(info, digests[k]) for k, info in self._entries.items()}

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tensors, revision and metadata to ``path`` atomically.

        Either the old file or the complete new one is at ``path`` at every moment,
        also across a crash. Raises ``OSError`` if the file cannot be written.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        digests = self.hashes()
        metas = [_meta(info, digests[k]) for k, info in self._entries.items()]
        header = _pack_header(self._revision, metas, list(self._entries))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                for key in self._entries:
                    f.write(b"\0" * (-f.tell() % _FILE_ALIGN))
                    f.write(self.host_buffer(key))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    @classmethod
    def load(cls, path: str | os.PathLike[str], into: SharedState | None = None) -> SharedState:
        """Read a checkpoint written by :meth:`save`.

        With ``into``, the file's keys, dtypes and shapes must match ``into``'s exactly;
        its tensors are overwritten in place and its revision set, and ``into`` is
        returned. Without it, a new state of CPU tensors is returned.

        Raises ``SharedStateError`` if the file is not a shared-state checkpoint, is
        truncated or corrupt (hash mismatch), or does not match ``into`` (the message
        names the key). Nothing in ``into`` is touched unless the file's structure
        matches; after a hash mismatch the named entries hold the file's corrupt bytes
        and the revision is unchanged. Raises ``OSError`` if the file cannot be read.
        """
        with open(os.fspath(path), "rb") as f:
            revision, metas = _read_header(f, os.fstat(f.fileno()).st_size)
            if into is None:
                target = cls(
                    [
                        TensorInfo(k, torch.empty(m.shape, dtype=dtype_from_name(m.dtype)), m.allow_content_inequality)
                        for k, m in metas.items()
                    ]
                )
            else:
                _check_matches(into, metas)
                target = into
            for key in metas:
                f.seek(_align(f.tell()))
                buf = target.receive_buffer(key)
                if f.readinto(buf) != len(buf):
                    raise SharedStateError(f"checkpoint {path!s} is truncated in entry {key!r}")
        digests = hash_buffers({k: target.receive_buffer(k) for k in metas}, torch.get_num_threads())
        bad = [k for k, d in digests.items() if d != metas[k].hash]
        if bad:
            raise SharedStateError(f"checkpoint {path!s} is corrupt: hash mismatch in entries {bad}")
        for key in metas:
            target.commit_host_buffer(key)
        target.revision = revision
        return target


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _meta(info: TensorInfo, digest: bytes) -> EntryMeta:
    t = info.tensor
    return EntryMeta(digest, dtype_name(t.dtype), tuple(t.shape), _nbytes(t), info.allow_content_inequality)


def _align(offset: int) -> int:
    return offset + (-offset % _FILE_ALIGN)


def _pack_header(revision: int, metas: list[EntryMeta], keys: list[str]) -> bytes:
    body = msgpack.packb(
        {
            "version": FILE_VERSION,
            "revision": revision,
            "entries": [
                [k, m.dtype, list(m.shape), m.nbytes, m.allow_content_inequality, m.hash] for k, m in zip(keys, metas)
            ],
        },
        use_bin_type=True,
    )
    return FILE_MAGIC + _HEADER_LEN.pack(len(body)) + body


def _read_header(f: IO[bytes], file_size: int) -> tuple[int, dict[str, EntryMeta]]:
    """Parse and validate the header; the file size must match the entries exactly."""
    prefix = f.read(len(FILE_MAGIC) + _HEADER_LEN.size)
    if len(prefix) != len(FILE_MAGIC) + _HEADER_LEN.size or prefix[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise SharedStateError("not a pccl shared-state checkpoint (bad magic)")
    (length,) = _HEADER_LEN.unpack_from(prefix, len(FILE_MAGIC))
    if length > min(_MAX_FILE_HEADER, file_size):
        raise SharedStateError("corrupt shared-state checkpoint: header length out of range")
    try:
        header = msgpack.unpackb(f.read(length), raw=False, strict_map_key=True)
        if header["version"] != FILE_VERSION:
            raise SharedStateError(f"unsupported shared-state checkpoint version {header['version']!r}")
        revision = _check_revision(header["revision"])
        metas: dict[str, EntryMeta] = {}
        for name, dtype, shape, nbytes, allow, digest in header["entries"]:
            dt = dtype_from_name(dtype)
            shape_t = tuple(int(s) for s in shape)
            numel = 1
            for s in shape_t:
                numel *= s
            if not isinstance(name, str) or name in metas or min(shape_t, default=0) < 0:
                raise SharedStateError(f"corrupt shared-state checkpoint: bad entry {name!r}")
            if nbytes != numel * dt.itemsize or not isinstance(digest, bytes) or len(digest) != 16:
                raise SharedStateError(f"corrupt shared-state checkpoint: bad entry {name!r}")
            metas[name] = EntryMeta(digest, dtype, shape_t, nbytes, bool(allow))
    except SharedStateError:
        raise
    except InvalidUsageError as exc:
        raise SharedStateError(f"corrupt shared-state checkpoint: {exc}") from exc
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise SharedStateError(f"corrupt shared-state checkpoint header: {exc!r}") from exc
    end = len(FILE_MAGIC) + _HEADER_LEN.size + length
    for m in metas.values():
        end = _align(end) + m.nbytes
    if end != file_size:
        raise SharedStateError(f"shared-state checkpoint is truncated or padded: {file_size} bytes, expected {end}")
    return revision, metas


def _check_matches(state: SharedState, metas: Mapping[str, EntryMeta]) -> None:
    missing = sorted(set(state.keys()) - set(metas))
    extra = sorted(set(metas) - set(state.keys()))
    if missing:
        raise SharedStateError(f"checkpoint lacks shared-state key {missing[0]!r}")
    if extra:
        raise SharedStateError(f"checkpoint has unexpected shared-state key {extra[0]!r}")
    for key, m in metas.items():
        t = state[key]
        if dtype_name(t.dtype) != m.dtype:
            raise SharedStateError(f"checkpoint entry {key!r} has dtype {m.dtype}, the state has {dtype_name(t.dtype)}")
        if tuple(t.shape) != m.shape:
            raise SharedStateError(f"checkpoint entry {key!r} has shape {list(m.shape)}, the state has {list(t.shape)}")


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; some filesystems refuse to open a directory (ignored)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
