"""The project's sparse format (see docs/sparse-op.md): kept values + packed little-endian bitmask.

numpy only, so the exporter and the torch-free runtime can use it too.
"""
from __future__ import annotations

import numpy as np


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool [rows, cols] -> uint8 [ceil(rows*cols/8)], bit i of the row-major flat index."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


def packed_mask_problem(packed: np.ndarray, shape: tuple[int, int]) -> str | None:
    """Why ``packed`` is not the packed mask of a ``shape`` matrix (None when it is): uint8, 1-D,
    exactly ceil(rows*cols/8) bytes, and the padding bits of the last byte zero."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        return f"the mask must be uint8, not {packed.dtype}"
    if packed.ndim != 1:
        return f"the mask must be 1-D, not of shape {list(packed.shape)}"
    need = mask_nbytes(shape)
    if packed.size != need:
        return f"the mask has {packed.size} bytes; a {shape[0]}x{shape[1]} mask has exactly {need}"
    spare = need * 8 - int(shape[0]) * int(shape[1])
    if spare and int(packed[-1]) >> (8 - spare):
        return "the mask sets padding bits past its last entry"
    return None


def unpack_mask(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 [ceil(rows*cols/8)] -> bool [rows, cols]; a mask of the wrong dtype or length is refused
    (never zero-padded or cut)."""
    problem = packed_mask_problem(packed, shape)
    if problem:
        raise ValueError(problem + ".")
    n = int(shape[0]) * int(shape[1])
    return np.unpackbits(np.asarray(packed), count=n, bitorder="little").astype(bool).reshape(shape)


def pack(dense: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense V and its mask -> (values in row-major order of kept entries, packed mask)."""
    mask = np.asarray(mask, dtype=bool)
    return np.ascontiguousarray(np.asarray(dense)[mask]), pack_mask(mask)


def transpose_packed(values: np.ndarray, packed: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(values, packed mask) of V [rows, cols] -> the same of Vᵀ [cols, rows] (kept entries in Vᵀ's row order)."""
    mask = unpack_mask(packed, shape)
    dense = unpack(values, packed, shape)
    return pack(np.ascontiguousarray(dense.T), np.ascontiguousarray(mask.T))


def unpack(values: np.ndarray, packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = unpack_mask(packed, shape)
    if np.asarray(values).ndim != 1:
        raise ValueError(f"values must be 1-D, not of shape {list(np.asarray(values).shape)}.")
    if int(mask.sum()) != values.size:
        raise ValueError(f"mask has {int(mask.sum())} kept entries but {values.size} values are stored.")
    out = np.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def mask_nbytes(shape: tuple[int, int]) -> int:
    return (int(shape[0]) * int(shape[1]) + 7) // 8


def popcount(packed: np.ndarray) -> int:
    """Set bits of a packed mask."""
    return int(np.unpackbits(np.asarray(packed, dtype=np.uint8)).sum())


def stored_bytes(nnz: int, shape: tuple[int, int], itemsize: int = 4) -> int:
    """Bytes of one sparse V as stored: values + bitmask."""
    return nnz * itemsize + mask_nbytes(shape)
