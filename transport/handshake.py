"""The connection handshake: versioned hello, mutual HMAC challenge-response, session keys
(with an ephemeral X25519 exchange when encrypting, for forward secrecy).

Wire flow and message fields are in ``docs/protocol.md`` §1. The functions here
only need a way to send and receive handshake frames (and to switch encryption
on, §2.1), so they run on a real connection and in tests alike.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Protocol

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.errors import AuthenticationError, InvalidUsageError, ProtocolError
from transport.frame import PROTOCOL_VERSION, FrameHeader, FrameType
from transport.message import decode, encode, message

NONCE_SIZE = 32
#: Size of an X25519 public key (the ``ephemeral`` fields, §1).
EPHEMERAL_SIZE = 32
#: Default time a handshake may take before the connection is dropped (§1).
HANDSHAKE_TIMEOUT = 5.0
MAX_ROLE_LEN = 64
MAX_PEER_ID_LEN = 256
MAX_POOL_SIZE = 256
_U64_MAX = (1 << 64) - 1
_TRANSCRIPT_LABEL = "pccl handshake v2"

PeerId = int | str | None


@message("transport.hello")
class Hello:
    """First frame of the connecting side (§1)."""

    version: int
    role: str
    peer_id: int | str | None
    nonce: bytes
    auth: bool
    link_id: int | None = None
    index: int = 0
    pool_size: int = 1
    encrypt: bool = False
    ephemeral: bytes = b""  # X25519 public key, exactly when ``encrypt``

    def __post_init__(self) -> None:
        _check_nonce(self.nonce)
        _check_ephemeral(self.ephemeral, self.encrypt)
        check_identity(self.role, self.peer_id)
        if self.link_id is not None and not 0 <= self.link_id <= _U64_MAX:
            raise ValueError("link_id must be an unsigned 64-bit integer")
        if not 1 <= self.pool_size <= MAX_POOL_SIZE or not 0 <= self.index < self.pool_size:
            raise ValueError(f"bad pool position {self.index} of {self.pool_size}")


@message("transport.challenge")
class Challenge:
    """The accepting side's nonce, its proof of the secret (empty without one) and identity (§1)."""

    nonce: bytes
    proof: bytes
    role: str
    peer_id: int | str | None
    ephemeral: bytes = b""  # X25519 public key, exactly when the client asked to encrypt

    def __post_init__(self) -> None:
        _check_nonce(self.nonce)
        if len(self.ephemeral) not in (0, EPHEMERAL_SIZE):
            raise ValueError(f"ephemeral key must be {EPHEMERAL_SIZE} bytes or empty, got {len(self.ephemeral)}")
        check_identity(self.role, self.peer_id)


@message("transport.auth")
class Auth:
    """The connecting side's proof of the secret (empty without one) (§1)."""

    proof: bytes


@message("transport.accept")
class Accept:
    """The handshake succeeded; ordinary frames follow (§1)."""


@message("transport.reject")
class Reject:
    """The accepting side refuses the connection and closes it (§1)."""

    reason: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Per-connection key material derived from the secret, both nonces and, when encrypting,
    the ephemeral X25519 exchange (HKDF-SHA256)."""

    client_to_server: bytes
    server_to_client: bytes


class HandshakeChannel(Protocol):
    """What the handshake needs from a connection."""

    def send_handshake(self, frame_type: FrameType, payload: bytes, *, version: int = PROTOCOL_VERSION) -> None:
        """Write one handshake frame carrying an encoded message."""

    async def recv_handshake(self) -> tuple[FrameHeader, bytearray]:
        """The next handshake frame (header version not enforced)."""

    def start_encryption(self, keys: SessionKeys) -> None:
        """Seal every frame written from now on and open every frame the peer sends after
        its last handshake frame (the server's ACCEPT, or the client's AUTH) with ``keys`` (§2.1)."""


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What both ends know after a successful handshake."""

    hello: Hello
    peer_role: str
    peer_id: PeerId
    keys: SessionKeys
    encrypt: bool = False


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


def _check_ephemeral(key: bytes, encrypt: bool) -> None:
    if len(key) != (EPHEMERAL_SIZE if encrypt else 0):
        want = f"{EPHEMERAL_SIZE} bytes" if encrypt else "empty"
        raise ValueError(f"ephemeral key must be {want} with encrypt={encrypt}, got {len(key)} bytes")


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    """The X25519 shared secret with the peer's ``public`` key.

    Raises:
        ProtocolError: ``public`` is a low-order point (the result would be all zeros).
    """
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise ProtocolError(f"unusable ephemeral key in the handshake: {exc}") from exc


def check_identity(role: str, peer_id: PeerId) -> None:
    """Raise ValueError unless ``role``/``peer_id`` fit the hello's limits (§1)."""
    if not role or len(role) > MAX_ROLE_LEN:
        raise ValueError(f"role must be 1..{MAX_ROLE_LEN} characters")
    if isinstance(peer_id, str) and len(peer_id) > MAX_PEER_ID_LEN:
        raise ValueError(f"peer id longer than {MAX_PEER_ID_LEN} characters")


def _transcript(hello_payload: bytes, challenge: Challenge) -> bytes:
    """The bytes both proofs are computed over: binds the hello, the server nonce, identity and ephemeral key."""
    packed: bytes = msgpack.packb(
        [_TRANSCRIPT_LABEL, hello_payload, challenge.nonce, challenge.role, challenge.peer_id, challenge.ephemeral],
        use_bin_type=True,
    )
    return hashlib.sha256(packed).digest()


def _proof(secret: bytes, side: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, side + transcript, hashlib.sha256).digest()


def derive_keys(
    secret: bytes | None, client_nonce: bytes, server_nonce: bytes, transcript: bytes, shared: bytes = b""
) -> SessionKeys:
    """HKDF-SHA256 over the secret and the X25519 ``shared`` secret (empty when not encrypting),
    salted with both nonces; one key per direction. Raises nothing."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=client_nonce + server_nonce,
        info=b"pccl session keys v2" + transcript,
    ).derive((secret or b"") + shared)
    return SessionKeys(okm[:32], okm[32:])


def check_encrypt(encrypt: bool, secret: bytes | None) -> None:
    """Raise InvalidUsageError when encryption is asked for without a secret to derive keys from."""
    if encrypt and not secret:
        raise InvalidUsageError(
            "encrypt=True needs a shared secret: the encryption keys are derived from it (pass secret=...)"
        )


def _encrypt_mismatch(server_encrypts: bool) -> str:
    if server_encrypts:
        return "this server encrypts all traffic; connect with encrypt=True (both ends must set encrypt alike)"
    return "this server does not encrypt traffic; connect without encrypt (both ends must set encrypt alike)"


def _version_mismatch(ours: int, theirs: int, we: str, they: str) -> str:
    verb = "speak" if we == "we" else "speaks"
    return f"protocol version mismatch: {we} {verb} {ours}, {they} speaks {theirs}"


async def client_handshake(
    channel: HandshakeChannel,
    *,
    role: str,
    peer_id: PeerId,
    secret: bytes | None,
    link_id: int | None = None,
    index: int = 0,
    pool_size: int = 1,
    version: int = PROTOCOL_VERSION,
    encrypt: bool = False,
) -> HandshakeResult:
    """Run the connecting side of §1 on ``channel``; with ``encrypt``, switch it to §2.1.

    Raises:
        AuthenticationError: the server refused us (its reason is in the message:
            e.g. encryption settings differ), could not prove it knows our secret,
            has no secret while we do, or speaks another protocol version (both
            versions are named).
        ProtocolError: the server sent something that is not a valid handshake.
        InvalidUsageError: bad ``role``/``peer_id``/pool arguments, or ``encrypt``
            without a secret.
    """
    check_encrypt(encrypt, secret)
    private = X25519PrivateKey.generate() if encrypt else None
    ephemeral = private.public_key().public_bytes_raw() if private is not None else b""
    try:
        hello = Hello(version, role, peer_id, secrets.token_bytes(NONCE_SIZE), secret is not None,
                      link_id, index, pool_size, encrypt, ephemeral)
    except ValueError as exc:
        raise InvalidUsageError(str(exc)) from exc
    hello_payload = encode(hello)
    channel.send_handshake(FrameType.HELLO, hello_payload, version=version)
    header, payload = await _recv(channel, version, (FrameType.CHALLENGE, FrameType.REJECT))
    challenge = decode(payload, expect=Challenge)
    transcript = _transcript(hello_payload, challenge)
    proof = b""
    if secret is not None:
        if not challenge.proof:
            raise AuthenticationError("the server does not use a shared secret but we do; refusing it")
        if not hmac.compare_digest(challenge.proof, _proof(secret, b"server", transcript)):
            raise AuthenticationError("the server could not prove it knows the shared secret (wrong secret?)")
        proof = _proof(secret, b"client", transcript)
    shared = b""
    if private is not None:
        if len(challenge.ephemeral) != EPHEMERAL_SIZE:
            raise ProtocolError("the server sent no ephemeral key although we encrypt")
        shared = _exchange(private, challenge.ephemeral)
    keys = derive_keys(secret, hello.nonce, challenge.nonce, transcript, shared)
    channel.send_handshake(FrameType.AUTH, encode(Auth(proof)), version=version)
    if encrypt:
        # Before ACCEPT can arrive: whatever the server sends behind it is sealed (§2.1).
        channel.start_encryption(keys)
    await _recv(channel, version, (FrameType.ACCEPT, FrameType.REJECT))
    return HandshakeResult(hello, challenge.role, challenge.peer_id, keys, encrypt)


async def server_handshake(
    channel: HandshakeChannel, *, role: str, peer_id: PeerId, secret: bytes | None, encrypt: bool = False
) -> HandshakeResult:
    """Run the accepting side of §1 on ``channel``; refusals are sent to the peer as REJECT.

    With ``encrypt`` only clients asking for encryption are accepted, and the
    channel is switched to §2.1 right after ACCEPT.

    Raises:
        AuthenticationError: wrong or missing secret, encryption settings that
            differ, or a protocol version mismatch.
        ProtocolError: the client sent something that is not a valid handshake.
        InvalidUsageError: ``encrypt`` without a secret.
    """
    check_encrypt(encrypt, secret)
    header, payload = await channel.recv_handshake()
    if header.type is not FrameType.HELLO:
        raise ProtocolError(f"expected HELLO, got {header.type.name}")
    if header.version != PROTOCOL_VERSION:
        reason = _version_mismatch(header.version, PROTOCOL_VERSION, "client", "server")
        _reject(channel, reason)
        raise AuthenticationError(reason)
    hello = decode(payload, expect=Hello)
    if hello.version != PROTOCOL_VERSION:
        reason = _version_mismatch(hello.version, PROTOCOL_VERSION, "client", "server")
        _reject(channel, reason)
        raise AuthenticationError(reason)
    if secret is not None and not hello.auth:
        _reject(channel, "this server requires a shared secret")
        raise AuthenticationError(f"peer {hello.peer_id!r} connected without the shared secret")
    if secret is None and hello.auth:
        _reject(channel, "this server has no shared secret configured")
        raise AuthenticationError(f"peer {hello.peer_id!r} offered a secret this server does not have")
    if hello.encrypt != encrypt:
        _reject(channel, _encrypt_mismatch(encrypt))
        raise AuthenticationError(
            f"peer {hello.peer_id!r} connected with encrypt={hello.encrypt}, this server has encrypt={encrypt}"
        )
    private = X25519PrivateKey.generate() if encrypt else None
    ephemeral = private.public_key().public_bytes_raw() if private is not None else b""
    challenge = Challenge(secrets.token_bytes(NONCE_SIZE), b"", role, peer_id, ephemeral)
    transcript = _transcript(bytes(payload), challenge)
    if secret is not None:
        challenge = Challenge(challenge.nonce, _proof(secret, b"server", transcript), role, peer_id, ephemeral)
    channel.send_handshake(FrameType.CHALLENGE, encode(challenge))
    header, payload = await channel.recv_handshake()
    if header.type is not FrameType.AUTH or header.version != PROTOCOL_VERSION:
        raise ProtocolError(f"expected AUTH, got {header.type.name}")
    auth = decode(payload, expect=Auth)
    expected = _proof(secret, b"client", transcript) if secret is not None else b""
    if not hmac.compare_digest(auth.proof, expected):
        _reject(channel, "authentication failed")
        raise AuthenticationError(f"peer {hello.peer_id!r} failed authentication (wrong secret?)")
    shared = _exchange(private, hello.ephemeral) if private is not None else b""
    channel.send_handshake(FrameType.ACCEPT, encode(Accept()))
    keys = derive_keys(secret, hello.nonce, challenge.nonce, transcript, shared)
    if encrypt:
        channel.start_encryption(keys)  # ACCEPT went out in clear; everything after it is sealed
    return HandshakeResult(hello, hello.role, hello.peer_id, keys, encrypt)


def _reject(channel: HandshakeChannel, reason: str) -> None:
    channel.send_handshake(FrameType.REJECT, encode(Reject(reason)))


async def _recv(
    channel: HandshakeChannel, version: int, allowed: tuple[FrameType, ...]
) -> tuple[FrameHeader, bytearray]:
    """Client side: the next frame, turning REJECT and version trouble into AuthenticationError."""
    header, payload = await channel.recv_handshake()
    if header.version != version:
        raise AuthenticationError(_version_mismatch(version, header.version, "we", "the server"))
    if header.type is FrameType.REJECT:
        reject = decode(payload, expect=Reject)
        raise AuthenticationError(f"the server refused the connection: {reject.reason}")
    if header.type not in allowed:
        raise ProtocolError(f"expected {allowed[0].name}, got {header.type.name}")
    return header, payload
