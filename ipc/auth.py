"""Mutual HMAC-SHA256 challenge–response for TCP peers: proof of the cluster secret.

Pure functions and the three handshake messages; the TCP transport does the IO. The
dialing side (client) opens with a fresh nonce (`Hello`); the accepting side (server)
answers with its own fresh nonce and its proof (`Challenge`); the client checks that proof
and answers with its own (`Proof`). Frames flow client -> server only after the server
has checked the client's proof.

Invariant: a proof is an HMAC under the secret of a transcript that binds the role, the
cluster id, both node ids and both nonces, so it verifies for exactly one handshake: a
proof replayed into another connection (fresh nonce), reflected to the other role, moved
to another pair of nodes or another cluster fails. Proofs are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Annotated

import msgspec

NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
SECRET_BYTES_MIN = 16
"""A shorter secret is a configuration mistake, caught at construction."""

_DOMAIN = b"dcluster.ipc.tcp.auth.v1"
_ROLE_CLIENT = b"client"
_ROLE_SERVER = b"server"
_IDS = struct.Struct("<QII")

Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
ProofBytes = Annotated[bytes, msgspec.Meta(min_length=PROOF_BYTES, max_length=PROOF_BYTES)]


class Hello(msgspec.Struct, frozen=True):
    """Client -> server: who I am and whom I want are in the frame header; my nonce."""

    nonce: Nonce


class Challenge(msgspec.Struct, frozen=True):
    """Server -> client: the server's nonce and its proof over both nonces."""

    nonce: Nonce
    proof: ProofBytes


class Proof(msgspec.Struct, frozen=True):
    """Client -> server: the client's proof; frames may follow on the same stream."""

    proof: ProofBytes


HANDSHAKE_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "ipc.tcp.hello": Hello,
    "ipc.tcp.challenge": Challenge,
    "ipc.tcp.proof": Proof,
}


@dataclass(frozen=True, slots=True)
class Transcript:
    """Everything one handshake's proofs bind. The client dialed; the server accepted."""

    cluster_id: int
    client_id: int
    server_id: int
    client_nonce: bytes
    server_nonce: bytes

    def __post_init__(self) -> None:
        assert 0 <= self.cluster_id < 1 << 64, self.cluster_id
        assert 0 <= self.client_id < 1 << 32, self.client_id
        assert 0 <= self.server_id < 1 << 32, self.server_id
        assert len(self.client_nonce) == NONCE_BYTES, len(self.client_nonce)
        assert len(self.server_nonce) == NONCE_BYTES, len(self.server_nonce)

    def message(self, role: bytes) -> bytes:
        """The bytes a `role` proof signs: fixed-width fields, so no two transcripts share
        an encoding."""
        ids = _IDS.pack(self.cluster_id, self.client_id, self.server_id)
        return b"|".join((_DOMAIN, role, ids)) + self.client_nonce + self.server_nonce


def new_nonce() -> bytes:
    """A fresh random nonce (the OS's CSPRNG: freshness, not simulation randomness)."""
    return os.urandom(NONCE_BYTES)


def check_secret(secret: bytes) -> None:
    assert isinstance(secret, bytes), type(secret)
    assert len(secret) >= SECRET_BYTES_MIN, f"a cluster secret needs {SECRET_BYTES_MIN}+ bytes"


def client_proof(secret: bytes, transcript: Transcript) -> bytes:
    return _prove(secret, _ROLE_CLIENT, transcript)


def server_proof(secret: bytes, transcript: Transcript) -> bytes:
    return _prove(secret, _ROLE_SERVER, transcript)


def verify_client_proof(secret: bytes, transcript: Transcript, proof: bytes) -> bool:
    return hmac.compare_digest(_prove(secret, _ROLE_CLIENT, transcript), proof)


def verify_server_proof(secret: bytes, transcript: Transcript, proof: bytes) -> bool:
    return hmac.compare_digest(_prove(secret, _ROLE_SERVER, transcript), proof)


def _prove(secret: bytes, role: bytes, transcript: Transcript) -> bytes:
    check_secret(secret)
    return hmac.digest(secret, transcript.message(role), hashlib.sha256)
