"""The project's sparse format (see docs/sparse-op.md): kept values + packed little-endian bitmask.

numpy only, so the exporter and the torch-free runtime can use it too.
"""
from __future__ import annotations

import numpy as np


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool [rows, cols] -> uint8 [ceil(rows*cols/8)], bit i of the row-major flat index."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


def unpack_mask(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    n = int(shape[0]) * int(shape[1])
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n, bitorder="little").astype(bool).reshape(shape)


def pack(dense: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense V and its mask -> (values in row-major order of kept entries, packed mask)."""
    mask = np.asarray(mask, dtype=bool)
    return np.ascontiguousarray(np.asarray(dense)[mask]), pack_mask(mask)


def unpack(values: np.ndarray, packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = unpack_mask(packed, shape)
    if int(mask.sum()) != values.size:
        raise ValueError(f"mask has {int(mask.sum())} kept entries but {values.size} values are stored.")
    out = np.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def mask_nbytes(shape: tuple[int, int]) -> int:
    return (int(shape[0]) * int(shape[1]) + 7) // 8


def stored_bytes(nnz: int, shape: tuple[int, int], itemsize: int = 4) -> int:
    """Bytes of one sparse V as stored: values + bitmask."""
    return nnz * itemsize + mask_nbytes(shape)
