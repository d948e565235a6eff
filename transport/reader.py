"""Sans-IO frame reader behind ``asyncio.BufferedProtocol`` (``docs/protocol.md`` §2, §4).

The reader hands out the buffer the next bytes must land in — the header
buffer, a control payload, or the destination slice a data sink chose for a DATA
payload — and turns completed frames into calls on a :class:`FrameHandler`.
It never copies payload bytes and never allocates before a header passed its
limits. It knows nothing about sockets; tests feed it bytes in any chunking.

On an encrypted connection (§2.1, :meth:`FrameReader.decrypt_with`) the header
is followed by its tag and checked before anything acts on it; payload records
land in a bounded record buffer and are decrypted from there into the same
destinations (the decryption is the only pass over the bytes).
"""

from __future__ import annotations

import enum
from typing import Protocol

from transport.crypto import RECORD_SIZE, TAG_SIZE, Opener
from transport.errors import ProtocolError
from transport.frame import HEADER_SIZE, FrameHeader, FrameType, unpack_header

#: Size of the throw-away buffer used to skip discarded payloads.
SCRATCH_SIZE = 256 * 1024
#: What a failed reader reads (and ignores) into until its transport closes.
FAILED_SCRATCH_SIZE = 4096


class FrameHandler(Protocol):
    """What the reader calls; every method may raise ``ProtocolError`` to reject the frame."""

    def on_frame(self, header: FrameHeader, payload: bytearray) -> None:
        """A complete non-DATA frame (payload owned by the callee from now on)."""

    def data_begin(self, header: FrameHeader) -> memoryview | None:
        """Where the payload of this DATA frame goes (exactly ``header.length`` bytes), or None to discard it."""

    def data_end(self, header: FrameHeader) -> None:
        """The DATA frame whose payload went to the view ``data_begin`` returned is complete."""


class _State(enum.Enum):
    HEADER = 1
    PAYLOAD = 2
    FAILED = 3


class FrameReader:
    """Incremental frame parser: call ``get_buffer()``, fill (part of) it, call ``buffer_updated(n)``."""

    def __init__(self, handler: FrameHandler) -> None:
        self._handler = handler
        self._header_buf = bytearray(HEADER_SIZE + TAG_SIZE)
        self._header_view = memoryview(self._header_buf)
        self._header_size = HEADER_SIZE  # + TAG_SIZE once decrypting
        self._opener: Opener | None = None
        self._record: memoryview | None = None  # one sealed record (ciphertext ‖ tag)
        self._aad = b""  # the current frame's header: associated data of its records
        self._plain = 0  # plaintext bytes of the current payload already opened
        # Allocated when a payload is first discarded: most connections never need it, and a
        # flood of half-open connections must not cost 256 KiB each.
        self._scratch: memoryview | None = None
        self._state = _State.HEADER
        self._filled = 0
        self._header: FrameHeader | None = None
        self._dest: memoryview | None = None  # None while discarding
        self._payload: bytearray | None = None  # control payload being filled
        #: During the handshake a peer's version is read, not enforced (§1).
        self.check_version = True
        #: Frame types accepted now; others are refused before their payload is read.
        self.accept: frozenset[FrameType] = frozenset(FrameType)

    @property
    def current(self) -> FrameHeader | None:
        """Header of the frame whose payload is being received, if any."""
        return self._header if self._state is _State.PAYLOAD else None

    @property
    def decrypting(self) -> bool:
        """Whether frames are opened with AES-GCM (§2.1)."""
        return self._opener is not None

    def decrypt_with(self, opener: Opener) -> None:
        """Open every frame whose header starts after this call with ``opener`` (§2.1).

        Raises:
            ProtocolError: called in the middle of a frame: the peer sent bytes
                before it could know that encryption starts (the reader fails).
        """
        if self._state is not _State.HEADER or self._filled:
            self.fail()
            raise ProtocolError("bytes arrived before the handshake completed")
        self._opener = opener
        self._header_size = HEADER_SIZE + TAG_SIZE
        self._record = memoryview(bytearray(RECORD_SIZE + TAG_SIZE))

    def get_buffer(self) -> memoryview:
        """The (never empty) buffer the next received bytes must be written to. Raises nothing."""
        if self._state is _State.HEADER:
            return self._header_view[self._filled : self._header_size]
        if self._state is _State.PAYLOAD:
            assert self._header is not None
            if self._record is not None:
                return self._record[self._filled : min(RECORD_SIZE, self._header.length - self._plain) + TAG_SIZE]
            if self._dest is not None:
                return self._dest[self._filled :]
            remaining = self._header.length - self._filled
            if self._scratch is None:
                self._scratch = memoryview(bytearray(SCRATCH_SIZE))
            return self._scratch[: min(remaining, SCRATCH_SIZE)]
        assert self._scratch is not None  # set by fail()
        return self._scratch  # failed: bytes are read and ignored until the transport closes

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()`` result.

        Raises:
            ProtocolError: the frame just completed is invalid (or the handler
                refused it); the reader then ignores everything after it.
        """
        try:
            if self._state is _State.HEADER:
                self._filled += nbytes
                if self._filled == self._header_size:
                    self._filled = 0
                    if self._opener is not None:
                        self._opener.open_header(self._header_view[: self._header_size], HEADER_SIZE)
                        self._aad = bytes(self._header_view[:HEADER_SIZE])
                    self._start(unpack_header(self._header_buf, check_version=self.check_version))
            elif self._record is not None and self._state is _State.PAYLOAD:
                self._filled += nbytes
                self._record_updated()
            elif self._state is _State.PAYLOAD:
                self._filled += nbytes
                assert self._header is not None
                if self._filled == self._header.length:
                    self._finish()
        except ProtocolError:
            self.fail()
            raise

    def _record_updated(self) -> None:
        """Encrypted payload: open the record once its ciphertext and tag are in (§2.1)."""
        header, opener, record = self._header, self._opener, self._record
        assert header is not None and opener is not None and record is not None
        size = min(RECORD_SIZE, header.length - self._plain)
        if self._filled < size + TAG_SIZE:
            return
        out = self._dest[self._plain : self._plain + size] if self._dest is not None else None
        opener.open_record(self._aad, record[: size + TAG_SIZE], out)
        self._filled = 0
        self._plain += size
        if self._plain == header.length:
            self._finish()

    def fail(self) -> None:
        """Stop interpreting bytes (the connection is being torn down). Raises nothing."""
        self._state = _State.FAILED
        self._dest = None
        self._payload = None
        # Release the big buffers now: a lost connection may wait in a reference cycle for
        # the garbage collector, and a flood of them must not hold on to memory meanwhile.
        self._record = None
        self._scratch = memoryview(bytearray(FAILED_SCRATCH_SIZE))

    def discard_current(self) -> FrameHeader | None:
        """Send the rest of the DATA payload being received to the scratch buffer.

        Used when its destination must no longer be written (the receive was
        cancelled or forgotten); ``data_end`` is then not called for it.
        Returns the header of the redirected frame, or None. Raises nothing.
        """
        header = self.current
        if header is None or header.type is not FrameType.DATA or self._dest is None:
            return None
        self._dest = None
        return header

    def _start(self, header: FrameHeader) -> None:
        if header.type not in self.accept:
            raise ProtocolError(f"{header.type.name} frame not allowed at this point")
        self._header = header
        self._state = _State.PAYLOAD
        if header.type is FrameType.DATA:
            dest = self._handler.data_begin(header)
            if dest is not None and len(dest) != header.length:
                raise ProtocolError("data sink returned a buffer of the wrong size")
            self._dest = dest
        else:
            self._payload = bytearray(header.length)
            self._dest = memoryview(self._payload)
        if header.length == 0:
            self._finish()

    def _finish(self) -> None:
        header = self._header
        assert header is not None
        self._state = _State.HEADER
        self._filled = 0
        self._header = None
        self._plain = 0
        dest, self._dest = self._dest, None
        if header.type is FrameType.DATA:
            if dest is not None:
                self._handler.data_end(header)
            return
        payload, self._payload = self._payload, None
        assert payload is not None
        self._handler.on_frame(header, payload)
