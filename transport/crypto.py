"""AES-GCM sealing of every frame after the handshake, when a connection encrypts.

The wire format is ``docs/protocol.md`` §2.1 (encrypted frames): the 48-byte header
travels in clear but is followed by a 16-byte GCM tag over it (the header is the
associated data of an empty message), and the payload is cut into records of at
most :data:`RECORD_SIZE` plaintext bytes, each sealed on its own (ciphertext, then
its 16-byte tag) with the header as associated data again. Each direction of a
connection has its own key (``SessionKeys``, §1) and its own counter of sealed
items; the 96-bit nonce is that counter, so no nonce ever repeats under one key
and records cannot be dropped, replayed or reordered without the next tag failing.

Authenticating the header on its own lets the reader refuse a forged header before
acting on it (allocating, choosing a destination buffer). Payload records are
decrypted straight into the destination: see :class:`Opener` for why a failed
record may leave unverified bytes there and why that is safe.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from transport.errors import ProtocolError

#: Plaintext bytes per sealed payload record (§2.1): bounded scratch memory per
#: connection, and a tampered record is caught after at most this many bytes.
RECORD_SIZE = 256 * 1024
#: Bytes of a GCM tag.
TAG_SIZE = 16
#: Bytes of a GCM nonce: the per-direction counter, little-endian.
NONCE_SIZE = 12
#: A direction that would seal its 2**64-th item closes the connection instead (§2.1).
COUNTER_LIMIT = 1 << 64
#: Sealed frames at least this big are built in recycled buffers: fresh big
#: allocations cost page faults that made sealing ~10x slower than AES itself.
POOL_MIN = 64 * 1024
#: Recycled buffers a sealer keeps (each about one DATA frame).
POOL_SIZE = 4


def record_count(length: int) -> int:
    """Sealed records carrying a payload of ``length`` plaintext bytes (none for an empty one)."""
    return -(-length // RECORD_SIZE)


def sealed_size(length: int) -> int:
    """Wire bytes of a payload of ``length`` plaintext bytes, record tags included (not the header's)."""
    return length + TAG_SIZE * record_count(length)


def nonce(counter: int) -> bytes:
    """The GCM nonce of the ``counter``-th item sealed in one direction (§2.1)."""
    return counter.to_bytes(NONCE_SIZE, "little")


class _Direction:
    """One direction of a connection: its AES-256-GCM key and its item counter."""

    def __init__(self, key: bytes, *, counter: int = 0) -> None:
        self._aead = AESGCM(key)
        #: Items sealed (or opened) so far; the next one uses ``nonce(counter)``.
        self.counter = counter

    def _reserve(self, items: int) -> int:
        """The first of ``items`` consecutive counters, or ProtocolError when they run out."""
        first = self.counter
        if first + items > COUNTER_LIMIT:
            raise ProtocolError("the AES-GCM nonce counter of this connection is used up; reconnect")
        self.counter = first + items
        return first


class Sealer(_Direction):
    """Seals the frames one side sends (§2.1).

    A sealed frame is one contiguous buffer: header, header tag, then each record
    (ciphertext ‖ tag). Big ones live in buffers the sealer reuses once the caller
    says, with :meth:`recycle`, that every frame sealed so far has been consumed.
    """

    def __init__(self, key: bytes, *, counter: int = 0) -> None:
        super().__init__(key, counter=counter)
        self._busy: list[bytearray] = []
        self._free: list[bytearray] = []

    def seal(self, header: bytes, payload: Any = None) -> memoryview:
        """The bytes to write for one frame (valid until the next :meth:`recycle`).

        ``payload`` is any C-contiguous bytes-like object (or None); it is not
        referenced afterwards, so the caller may reuse it at once.

        Raises:
            ProtocolError: the nonce counter would run out (the connection must close).
        """
        view = memoryview(b"" if payload is None else payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        counter = self._reserve(1 + record_count(length))
        pos = len(header) + TAG_SIZE
        out = self._buffer(pos + sealed_size(length))
        out[: len(header)] = header
        seal = self._aead.encrypt_into
        seal(nonce(counter), b"", header, out[len(header) : pos])
        for start in range(0, length, RECORD_SIZE):
            counter += 1
            chunk = view[start : start + RECORD_SIZE]
            end = pos + len(chunk) + TAG_SIZE
            seal(nonce(counter), chunk, header, out[pos:end])
            pos = end
        return out

    def recycle(self) -> None:
        """Every frame sealed so far was consumed (written to the kernel): reuse its buffer."""
        self._free = (self._free + self._busy)[-POOL_SIZE:]
        self._busy.clear()

    def _buffer(self, size: int) -> memoryview:
        if size < POOL_MIN:
            return memoryview(bytearray(size))
        for i, buf in enumerate(self._free):
            if size <= len(buf) <= 2 * size:
                del self._free[i]
                break
        else:
            buf = bytearray(size)
        self._busy.append(buf)
        return memoryview(buf)[:size]


class Opener(_Direction):
    """Verifies and decrypts the frames one side receives (§2.1).

    A record is decrypted straight into its destination (the slice of the posted
    buffer, or the control payload), and GCM checks its tag at the end. If the check
    fails, that slice may hold unverified bytes: the reader then raises
    ``ProtocolError``, the connection is aborted, and with it its link, which fails
    every transfer still being received on it — including the one that owns the
    slice, since a transfer completes only after all its frames were verified. So a
    tampered record can never be part of a result anyone sees as successful, and no
    extra copy of the payload is needed (the collective restores its input, §7.6).
    """

    def open_header(self, sealed: memoryview, header_size: int) -> None:
        """Check the tag that follows the header (``sealed`` = header ‖ tag).

        Raises:
            ProtocolError: the tag does not match (tampered, or not from our peer).
        """
        counter = self._reserve(1)
        try:
            self._aead.decrypt(nonce(counter), sealed[header_size:], sealed[:header_size])
        except InvalidTag:
            raise ProtocolError("frame header failed authentication (tampered or forged)") from None

    def open_record(self, header: bytes, sealed: memoryview, out: memoryview | None) -> None:
        """Verify one record (ciphertext ‖ tag) and decrypt it into ``out`` (None: verify only).

        Raises:
            ProtocolError: the tag does not match; ``out`` may hold unverified bytes.
        """
        counter = self._reserve(1)
        try:
            if out is None:
                self._aead.decrypt(nonce(counter), sealed, header)
            else:
                self._aead.decrypt_into(nonce(counter), sealed, header, out)
        except InvalidTag:
            raise ProtocolError("frame payload failed authentication (tampered or forged)") from None


def session_ciphers(client_to_server: bytes, server_to_client: bytes, *, is_client: bool) -> tuple[Sealer, Opener]:
    """(what this side seals with, what it opens with) for one connection. Raises nothing."""
    if is_client:
        return Sealer(client_to_server), Opener(server_to_client)
    return Sealer(server_to_client), Opener(client_to_server)
