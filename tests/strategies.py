"""Shared hypothesis strategies and seeds of the registry-driven tests."""

from __future__ import annotations

import zlib

from hypothesis import strategies as st

from genloss import registry as R


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def sizes(max_batch: int, max_dim: int, max_trailing: int = 3) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            **{s: st.integers(1, max_batch) for s in R.BATCH_SYMBOLS},
            **{s: st.integers(1, max_dim) for s in R.DIM_SYMBOLS},
            "K": st.integers(2, max_dim + 1),
            **{
                g: st.lists(st.integers(1, max_dim), max_size=max_trailing).map(tuple)
                for g in R.GROUP_SYMBOLS
            },
        }
    )
