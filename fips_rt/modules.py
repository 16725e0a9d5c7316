"""Modules that replace compressed linears in place.

FiPS:   ``SharedBasis`` holds U (d x r), one instance per group, referenced by every FipsLinear of the
        group (``model.parameters()`` yields it once). ``FipsLinear`` holds V (r x d_ff) dense while
        training plus its boolean ``mask``; V is kept exactly zero outside the mask.
        d -> d_ff ("in"):  y = (x U) V + b          d_ff -> d ("out"): y = (x V^T) U^T + b
DeltaLLM: ``DeltaLinear`` = shared weight (one Parameter reused by several modules) + low-rank A B.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .sparse_format import pack, unpack, unpack_mask


class SharedBasis(nn.Module):
    def __init__(self, U: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(U.contiguous())

    @property
    def rank(self) -> int:
        return self.weight.shape[1]


class FipsLinear(nn.Module):
    def __init__(self, basis: SharedBasis, V: torch.Tensor, mask: torch.Tensor, orientation: str,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if orientation not in ("in", "out"):
            raise ValueError(f"orientation must be 'in' or 'out', got {orientation!r}")
        self.basis = basis
        self.orientation = orientation
        self.V = nn.Parameter((V * mask).contiguous())
        self.register_buffer("mask", mask.to(torch.bool).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        d = basis.weight.shape[0]
        self.in_features, self.out_features = (d, V.shape[1]) if orientation == "in" else (V.shape[1], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U = self.basis.weight
        if self.orientation == "in":
            y = (x @ U.to(x.dtype)) @ self.V.to(x.dtype)
        else:
            y = (x @ self.V.to(x.dtype).T) @ U.to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        self.V.mul_(self.mask)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The equivalent nn.Linear weight ([out, in])."""
        W = self.basis.weight @ (self.V * self.mask)  # d x d_ff
        return W.T.contiguous() if self.orientation == "in" else W.contiguous()

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(values float32, packed uint8 bitmask) in the project's sparse format."""
        v = self.V.detach().float().cpu().numpy()
        return pack(v, self.mask.cpu().numpy())

    @classmethod
    def from_packed(cls, basis: SharedBasis, values: torch.Tensor, mask_bytes: torch.Tensor,
                    shape: tuple[int, int], orientation: str, bias: torch.Tensor | None = None) -> "FipsLinear":
        """Rebuild from the stored (values, packed mask); a mask that is not uint8 of exactly
        ceil(rows*cols/8) bytes, or values whose count differs from the mask's, raise ValueError."""
        if mask_bytes.dtype != torch.uint8:
            raise ValueError(f"the mask must be uint8, not {mask_bytes.dtype}.")
        if not values.dtype.is_floating_point:
            raise ValueError(f"the values must be floating point, not {values.dtype}.")
        if basis.weight.dim() != 2 or int(shape[0]) != basis.rank:
            raise ValueError(f"V has {shape[0]} rows but the basis has rank {basis.rank}.")
        packed = mask_bytes.detach().cpu().contiguous().numpy()
        mask = unpack_mask(packed, shape)
        dense = unpack(values.detach().float().cpu().contiguous().numpy(), packed, shape)
        return cls(basis, torch.from_numpy(dense), torch.from_numpy(mask), orientation, bias)

    def extra_repr(self) -> str:
        density = self.nnz / self.mask.numel()
        return (f"{self.orientation}, in={self.in_features}, out={self.out_features}, rank={self.basis.rank}, "
                f"density={density:.3f}")


class DeltaLinear(nn.Module):
    """y = s · x W_shared^T + (x B^T) A^T + b, with W_shared shared by several blocks (one Parameter).

    ``scale`` s is a plain float fixed at init: 1 is DeltaLLM's W_a + A B; ``DeltaConfig.anchor_scale="fit"``
    sets the least-squares s of W_f ~ s W_a (0 skips the shared product)."""

    def __init__(self, shared: nn.Parameter, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: float = 1.0):
        super().__init__()
        self.shared = shared  # registered Parameter, the same object in several modules
        self.A = nn.Parameter(A.contiguous())  # out x r
        self.B = nn.Parameter(B.contiguous())  # r x in
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.scale = float(scale)
        self.out_features, self.in_features = shared.shape

    def forward(self, x):
        y = (x @ self.B.to(x.dtype).T) @ self.A.to(x.dtype).T
        if self.scale == 1.0:
            y = x @ self.shared.to(x.dtype).T + y
        elif self.scale != 0.0:
            y = self.scale * (x @ self.shared.to(x.dtype).T) + y
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def rank(self) -> int:
        return self.A.shape[1]
