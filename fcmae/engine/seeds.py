"""Deterministic seeds derived from integers (run seed, epoch, step, rank...), so nothing depends on RNG history."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from any tuple of ints; different tuples give unrelated seeds."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
