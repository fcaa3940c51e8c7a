"""core.merkle against RFC 9162's definitions: known roots, and every inclusion and consistency proof of
small trees checked with the RFC's verification algorithms (sections 2.1.3.2 and 2.1.4.2)."""

from __future__ import annotations

import hashlib

import pytest

from core import merkle

# The leaves and roots used by Certificate Transparency implementations (RFC 6962/9162 test data).
LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def mth(leaves: list[bytes]) -> bytes:
    """MTH exactly as RFC 9162 section 2.1.1 defines it (recursive, from the raw leaves)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def test_known_roots() -> None:
    assert merkle.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for n, expected in enumerate(ROOTS, start=1):
        hashes = [merkle.leaf_hash(leaf) for leaf in LEAVES[:n]]
        assert merkle.root_from_leaf_hashes(hashes).hex() == expected
        assert mth(LEAVES[:n]).hex() == expected


def _data(n: int) -> list[bytes]:
    return [f"event {i}".encode() for i in range(n)]


def _subtree(data: list[bytes]):  # type: ignore[no-untyped-def]
    return lambda lo, hi: mth(data[lo:hi])


@pytest.mark.parametrize("size", range(1, 34))
def test_every_inclusion_proof_verifies_and_only_for_its_leaf(size: int) -> None:
    data = _data(size)
    root = mth(data)
    for index in range(size):
        proof = merkle.inclusion_proof(index, size, _subtree(data))
        leaf = merkle.leaf_hash(data[index])
        assert merkle.verify_inclusion(leaf, index, size, proof, root)
        assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), index, size, proof, root)
        if size > 1:
            assert not merkle.verify_inclusion(leaf, (index + 1) % size, size, proof, root)
        assert not merkle.verify_inclusion(leaf, index, size, proof, mth([*data, b"later"]))
        assert not merkle.verify_inclusion(leaf, size, size, proof, root)  # outside the tree


@pytest.mark.parametrize("new_size", range(1, 34))
def test_every_consistency_proof_verifies_and_detects_a_rewritten_past(new_size: int) -> None:
    data = _data(new_size)
    new_root = mth(data)
    for old_size in range(1, new_size + 1):
        proof = merkle.consistency_proof(old_size, new_size, _subtree(data))
        old_root = mth(data[:old_size])
        assert merkle.verify_consistency(old_size, new_size, proof, old_root, new_root)
        rewritten = mth([b"rewritten", *data[1:old_size]])
        assert not merkle.verify_consistency(old_size, new_size, proof, rewritten, new_root) or old_size == 0
        if old_size < new_size:
            assert not merkle.verify_consistency(old_size, new_size, [], old_root, new_root)


def test_compact_range_matches_the_definition_at_every_size() -> None:
    data = _data(70)
    compact = merkle.CompactRange()
    for n, item in enumerate(data, start=1):
        compact.append(merkle.leaf_hash(item))
        assert compact.root() == mth(data[:n]) and len(compact.hashes) == bin(n).count("1")
    resumed = merkle.CompactRange(compact.size, compact.hashes)
    assert resumed.root() == compact.root()
