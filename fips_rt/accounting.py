"""Parameters and bytes, dense vs compressed, MLP-only and whole model, per group.

Parameters follow the paper's convention (V nonzeros + dense U, each shared tensor once). Bytes are
what is really stored: V values + packed bitmasks + U + every unchanged parameter, each once.
"""
from __future__ import annotations

from .adapters import Adapter, get_submodule, linear_paths
from .modules import DeltaLinear, FipsLinear
from .sparse_format import mask_nbytes


def _bias(m) -> int:
    b = getattr(m, "bias", None)
    return 0 if b is None else b.numel()


def count_model(model, adapter: Adapter, itemsize: int = 4) -> dict:
    mlp_paths = [p for layer in linear_paths(model, adapter) for p, _ in layer]
    mlp_dense = mlp_params = mlp_bytes = 0
    counted: set[int] = set()  # ids of shared tensors already counted (U, DeltaLLM shared weights)
    groups: dict[int, dict] = {}
    for path in mlp_paths:
        m = get_submodule(model, path)
        mlp_dense += m.in_features * m.out_features + _bias(m)
        if isinstance(m, FipsLinear):
            n = m.nnz + _bias(m)
            b = m.nnz * itemsize + mask_nbytes(tuple(m.V.shape)) + _bias(m) * itemsize
            g = groups.setdefault(id(m.basis), {"rank": m.basis.rank, "linears": 0, "u_params": m.basis.weight.numel(),
                                                "v_nnz": 0, "v_entries": 0, "mask_bytes": 0,
                                                "dense_params": 0})
            g["linears"] += 1
            g["v_nnz"] += m.nnz
            g["v_entries"] += m.mask.numel()
            g["mask_bytes"] += mask_nbytes(tuple(m.V.shape))
            g["dense_params"] += m.in_features * m.out_features
            if id(m.basis) not in counted:
                counted.add(id(m.basis))
                n += m.basis.weight.numel()
                b += m.basis.weight.numel() * itemsize
        elif isinstance(m, DeltaLinear):
            n = m.A.numel() + m.B.numel() + _bias(m)
            if id(m.shared) not in counted:
                counted.add(id(m.shared))
                n += m.shared.numel()
            b = n * itemsize
        else:
            n = m.weight.numel() + _bias(m)
            b = n * itemsize
        mlp_params += n
        mlp_bytes += b
    mlp_ids = set()
    for path in mlp_paths:
        for p in get_submodule(model, path).parameters():
            mlp_ids.add(id(p))
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in mlp_ids)
    # DeltaLLM may share linears outside the MLPs too (share_attention): their dense count is out x in each
    in_mlp = set(mlp_paths)
    outside = [m for n, m in model.named_modules() if isinstance(m, DeltaLinear) and n not in in_mlp]
    outside_params = sum(p.numel() for p in {id(p): p for m in outside for p in m.parameters()}.values())
    outside_dense = sum(m.in_features * m.out_features + _bias(m) for m in outside)
    params = other + mlp_params
    params_dense = other - outside_params + outside_dense + mlp_dense
    per_group = []
    for g in groups.values():
        g["density"] = g["v_nnz"] / max(1, g["v_entries"])
        g["params"] = g["u_params"] + g["v_nnz"]
        g["bytes"] = (g["u_params"] + g["v_nnz"]) * itemsize + g["mask_bytes"]
        per_group.append(g)
    return {
        "mlp_params_dense": mlp_dense, "mlp_params": mlp_params,
        "params_dense": params_dense, "params": params,
        "mlp_bytes_dense": mlp_dense * itemsize, "mlp_bytes": mlp_bytes,
        "bytes_dense": params_dense * itemsize, "bytes": other * itemsize + mlp_bytes,
        "mlp_ratio": mlp_params / mlp_dense, "params_ratio": params / params_dense,
        "bytes_ratio": (other * itemsize + mlp_bytes) / (params_dense * itemsize),
        "groups": per_group,
    }
