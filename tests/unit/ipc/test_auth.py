"""The HMAC challenge–response of TCP peers (ipc/auth.py): pure functions, no sockets.

A proof made with the right secret verifies for exactly the handshake it was made for;
a wrong secret, a replayed or swapped nonce, another pair of nodes, another cluster or
the other role's proof does not.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from ipc import auth
from ipc.codec import Codec, cluster_id_for
from ipc.errors import MalformedBody

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32


def transcript(**changes: object) -> auth.Transcript:
    base = auth.Transcript(
        cluster_id=cluster_id_for("auth-test"),
        client_id=1,
        server_id=2,
        client_nonce=b"c" * auth.NONCE_BYTES,
        server_nonce=b"n" * auth.NONCE_BYTES,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_right_secret_verifies_both_ways() -> None:
    t = transcript()
    assert auth.verify_client_proof(SECRET, t, auth.client_proof(SECRET, t))
    assert auth.verify_server_proof(SECRET, t, auth.server_proof(SECRET, t))
    assert len(auth.client_proof(SECRET, t)) == auth.PROOF_BYTES


def test_a_wrong_secret_is_refused() -> None:
    t = transcript()
    assert not auth.verify_client_proof(SECRET, t, auth.client_proof(OTHER_SECRET, t))
    assert not auth.verify_server_proof(SECRET, t, auth.server_proof(OTHER_SECRET, t))


def test_a_proof_replayed_into_a_new_handshake_is_refused() -> None:
    old = transcript()
    proof = auth.client_proof(SECRET, old)
    fresh_server_nonce = transcript(server_nonce=auth.new_nonce())
    assert not auth.verify_client_proof(SECRET, fresh_server_nonce, proof)
    fresh_client_nonce = transcript(client_nonce=auth.new_nonce())
    assert not auth.verify_server_proof(SECRET, fresh_client_nonce, auth.server_proof(SECRET, old))


def test_swapped_nonces_are_refused() -> None:
    t = transcript()
    swapped = transcript(client_nonce=t.server_nonce, server_nonce=t.client_nonce)
    assert not auth.verify_client_proof(SECRET, swapped, auth.client_proof(SECRET, t))
    assert not auth.verify_server_proof(SECRET, swapped, auth.server_proof(SECRET, t))


def test_a_proof_for_other_nodes_or_swapped_roles_is_refused() -> None:
    t = transcript()
    proof = auth.client_proof(SECRET, t)
    assert not auth.verify_client_proof(SECRET, transcript(client_id=3), proof)
    assert not auth.verify_client_proof(SECRET, transcript(server_id=3), proof)
    swapped_ids = transcript(client_id=t.server_id, server_id=t.client_id)
    assert not auth.verify_client_proof(SECRET, swapped_ids, proof)
    # A server's proof is no client proof: reflecting it back does not authenticate.
    assert not auth.verify_client_proof(SECRET, t, auth.server_proof(SECRET, t))
    assert not auth.verify_server_proof(SECRET, t, proof)


def test_a_proof_for_another_cluster_is_refused() -> None:
    t = transcript()
    other = transcript(cluster_id=cluster_id_for("another-cluster"))
    assert not auth.verify_client_proof(SECRET, other, auth.client_proof(SECRET, t))
    assert not auth.verify_server_proof(SECRET, other, auth.server_proof(SECRET, t))


def test_nonces_are_fresh() -> None:
    nonces = {auth.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(nonce) == auth.NONCE_BYTES for nonce in nonces)


def test_a_short_secret_is_a_configuration_mistake() -> None:
    with pytest.raises(AssertionError):
        auth.client_proof(b"short", transcript())


def test_handshake_messages_refuse_a_nonce_or_proof_of_the_wrong_length() -> None:
    codec = Codec(cluster_id_for("auth-test"), auth.HANDSHAKE_MESSAGES)
    frame = codec.encode(1, 2, auth.Hello(b"c" * auth.NONCE_BYTES))
    assert codec.decode(frame).message == auth.Hello(b"c" * auth.NONCE_BYTES)

    class ShortHello(msgspec.Struct, frozen=True):
        nonce: bytes

    forger = Codec(cluster_id_for("auth-test"), {"ipc.tcp.hello": ShortHello})
    with pytest.raises(MalformedBody):
        codec.decode(forger.encode(1, 2, ShortHello(b"c" * (auth.NONCE_BYTES - 1))))
    assert all(tag.startswith("ipc.tcp.") for tag in auth.HANDSHAKE_MESSAGES)
