"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing, proofs and their verification.

Pure functions, no I/O. The tree over leaves ``D[0:n]`` is defined as in RFC 9162 section 2.1.1::

    MTH({})       = SHA-256()
    MTH({d0})     = SHA-256(0x00 || d0)
    MTH(D[0:n])   = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k = largest power of two < n

Proof generation takes a ``subtree(lo, hi)`` callable that returns ``MTH(D[lo:hi])``; the ranges asked
for are always a perfect, aligned subtree or a right edge made of them, so a store of perfect
subtree hashes (:mod:`core.audit_log`) answers each in at most log2(n) lookups. Verification follows
the algorithms of RFC 9162 sections 2.1.3.2 (inclusion) and 2.1.4.2 (consistency) literally.

``pymerkle`` was evaluated and not used: its trees live in memory or in its own SQLite backend, while
this log's nodes must live in Postgres next to the events, written by one sealer transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
Subtree = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaves given by their leaf hashes (iterative; O(n) time, O(log n) memory)."""
    compact = CompactRange()
    for h in hashes:
        compact.append(h)
    return compact.root()


class CompactRange:
    """The right frontier of a tree: one perfect subtree hash per set bit of its size.

    Appending leaves and taking roots costs O(log n) memory; a verifier keeps one of these to check a
    prefix of the log against a checkpoint without trusting any stored interior node.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError("a compact range holds one hash per set bit of its size")
        self.size = size
        self.hashes = list(hashes)  # left to right: biggest subtree first

    def append(self, leaf: bytes) -> None:
        self.hashes.append(leaf)
        self.size += 1
        size = self.size
        while size & 1 == 0:  # merge equal-sized neighbours, as binary addition carries
            right = self.hashes.pop()
            self.hashes[-1] = node_hash(self.hashes[-1], right)
            size >>= 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        acc = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            acc = node_hash(h, acc)
        return acc


# --------------------------------------------------------------------------- proofs (RFC 9162 2.1.3.1, 2.1.4.1)


def inclusion_proof(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(m, D[0:n]) of RFC 9162 section 2.1.3.1."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = split(n)
        if m < k:
            return [*path(m, lo, lo + k), subtree(lo + k, hi)]
        return [*path(m - k, lo + k, hi), subtree(lo, lo + k)]

    return path(index, 0, size)


def consistency_proof(old_size: int, new_size: int, subtree: Subtree) -> list[bytes]:
    """PROOF(m, D[0:n]) of RFC 9162 section 2.1.4.1 (empty when m == n or m == 0)."""
    if not 0 <= old_size <= new_size:
        raise ValueError("old size must be between 0 and the new size")
    if old_size in (0, new_size):
        return []

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [subtree(lo, hi)]
        k = split(n)
        if m <= k:
            return [*subproof(m, lo, lo + k, complete), subtree(lo + k, hi)]
        return [*subproof(m - k, lo + k, hi, False), subtree(lo, lo + k)]

    return subproof(old_size, 0, new_size, True)


# --------------------------------------------------------------------------- verification (2.1.3.2, 2.1.4.2)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2 for the leaf hash ``leaf`` at ``index`` in a tree of ``size``."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> bool:
    """RFC 9162 section 2.1.4.2: the tree of ``new_size`` extends the one of ``old_size``."""
    if old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # every tree extends the empty one
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node of the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
