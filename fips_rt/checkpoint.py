"""The ``model.pt`` checkpoint: everything needed to rebuild, evaluate and export a compressed model.

Layout (a plain ``torch.save`` zip; loads with ``torch.load(path, weights_only=True)``)::

    {"format": "fips-rt", "format_version": 1,
     "header":  {method, config, source (HF config / timm name), structure, report, versions},
     "tokenizer_files": {name: bytes},
     "tensors": {name: tensor}}

``tensors`` holds every unchanged parameter/buffer once (tied weights are recorded as aliases), each
shared basis U once (``basis.<i>``), each FiPS V as ``<path>.values`` (float) + ``<path>.mask`` (uint8
packed bitmask, docs/sparse-op.md), DeltaLLM shared matrices once (``shared.<i>``) and deltas
(``<path>.A``/``<path>.B``). Integrity: the zip's end-of-archive comment carries the SHA-256 of the
whole file written with an empty comment; any changed or missing byte is refused on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .errors import CheckpointError

FORMAT = "fips-rt"
FORMAT_VERSION = 1
_TAG = b"FIPSRT-SHA256:"
_COMMENT_LEN = len(_TAG) + 64
_EOCD_SIG = b"PK\x05\x06"


# ---------------------------------------------------------------- integrity (zip comment)
def _sha256_file(path: Path, length: int, tail: bytes = b"") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0:
            chunk = f.read(min(1 << 22, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    h.update(tail)
    return h.hexdigest()


def _seal(path: Path) -> None:
    """Append the file's SHA-256 as the zip comment (the file was written with an empty comment)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(size - 22)
        eocd = f.read(22)
    if eocd[:4] != _EOCD_SIG or eocd[20:22] != b"\x00\x00":
        raise RuntimeError("unexpected zip layout from torch.save")
    digest = _sha256_file(path, size)
    with open(path, "r+b") as f:
        f.seek(size - 2)
        f.write(_COMMENT_LEN.to_bytes(2, "little") + _TAG + digest.encode())


def verify_file(path: str | os.PathLike) -> None:
    """Refuse a truncated or altered checkpoint with one clear sentence."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    size = p.stat().st_size
    if size < 22 + _COMMENT_LEN:
        raise CheckpointError(f"{path} is not a fips-rt checkpoint (too small; truncated?).")
    with open(p, "rb") as f:
        f.seek(size - 22 - _COMMENT_LEN)
        tail = f.read()
    eocd, comment = tail[:22], tail[22:]
    if eocd[:4] != _EOCD_SIG or not comment.startswith(_TAG) or int.from_bytes(eocd[20:22], "little") != _COMMENT_LEN:
        raise CheckpointError(f"{path} is truncated or not a fips-rt checkpoint (no integrity seal at its end).")
    expected = comment[len(_TAG):].decode("ascii", "replace")
    actual = _sha256_file(p, size - _COMMENT_LEN - 2, b"\x00\x00")
    if actual != expected:
        raise CheckpointError(f"{path} is corrupted: its checksum does not match (altered or damaged file).")


# ---------------------------------------------------------------- save
def _versions() -> dict[str, str]:
    import torch
    out = {"fips_rt": __import__("fips_rt").__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def collect_tensors(model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a compressed model into stored tensors + a JSON-able structure description."""
    import torch
    from .modules import DeltaLinear, FipsLinear

    tensors: dict[str, torch.Tensor] = {}
    fips, delta = [], []
    basis_ids: dict[int, str] = {}
    shared_ids: dict[int, str] = {}
    replaced: set[str] = set()
    for path, mod in model.named_modules():
        if isinstance(mod, FipsLinear):
            key = basis_ids.setdefault(id(mod.basis), f"basis.{len(basis_ids)}")
            if key not in tensors:
                tensors[key] = mod.basis.weight.detach().float().cpu().contiguous()
            values, mask = mod.packed()
            tensors[f"{path}.values"] = torch.from_numpy(values)
            tensors[f"{path}.mask"] = torch.from_numpy(mask)
            if mod.bias is not None:
                tensors[f"{path}.bias"] = mod.bias.detach().float().cpu()
            fips.append({"path": path, "orientation": mod.orientation, "basis": key,
                         "shape": list(mod.V.shape), "nnz": mod.nnz, "bias": mod.bias is not None})
            replaced.add(path)
        elif isinstance(mod, DeltaLinear):
            key = shared_ids.setdefault(id(mod.shared), f"shared.{len(shared_ids)}")
            if key not in tensors:
                tensors[key] = mod.shared.detach().float().cpu().contiguous()
            tensors[f"{path}.A"] = mod.A.detach().float().cpu().contiguous()
            tensors[f"{path}.B"] = mod.B.detach().float().cpu().contiguous()
            if mod.bias is not None:
                tensors[f"{path}.bias"] = mod.bias.detach().float().cpu()
            delta.append({"path": path, "shared": key, "rank": mod.rank, "bias": mod.bias is not None})
            replaced.add(path)
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        k = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and k in seen:
            aliases[name] = seen[k]
            continue
        seen[k] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, {"fips_linears": fips, "delta_linears": delta, "aliases": aliases}


def save_checkpoint(path: str | os.PathLike, lm, method: str, config: dict, report: dict | None = None) -> Path:
    """Write ``model.pt`` atomically (temporary name, fsync, rename); refuses to write over its input."""
    import torch
    out = Path(path)
    if out.suffix != ".pt":
        raise CheckpointError(f"the checkpoint name must end in .pt (got {out.name}).")
    tensors, structure = collect_tensors(lm.model)
    source = {k: v for k, v in lm.source.items() if k != "tokenizer_files"}
    header = {"method": method, "config": config, "source": source, "structure": structure,
              "family": lm.adapter.family, "kind": lm.adapter.kind, "name": lm.name,
              "report": report or {}, "versions": _versions(),
              "extra": {k: v for k, v in lm.extra.items() if k != "checkpoint_header"}}
    header = json.loads(json.dumps(header, default=str))  # plain types only: weights_only-loadable
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
           "tokenizer_files": dict(lm.source.get("tokenizer_files", {})), "tensors": tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        _seal(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ---------------------------------------------------------------- load
def read_checkpoint(path: str | os.PathLike) -> dict:
    """Verify and read the raw checkpoint dict (weights_only: nothing of the file is unpickled as code)."""
    import torch
    verify_file(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fips-rt checkpoint.")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {obj.get('format_version')}; this fips-rt "
                              f"reads version {FORMAT_VERSION}. Upgrade fips-rt or re-export.")
    return obj


def read_header(path: str | os.PathLike) -> dict:
    return read_checkpoint(path)["header"]


def load_checkpoint(path: str | os.PathLike):
    """Rebuild the compressed model (a ``LoadedModel``) from ``model.pt`` alone."""
    import torch
    from torch import nn

    from .adapters import adapter_for, get_submodule, set_submodule
    from .models import LoadedModel, build_from_source
    from .modules import DeltaLinear, FipsLinear, SharedBasis

    obj = read_checkpoint(path)
    header, tensors = obj["header"], obj["tensors"]
    source = dict(header["source"], tokenizer_files=obj.get("tokenizer_files", {}))
    model, tok = build_from_source(source)
    structure = header["structure"]

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{path} is incomplete: tensor {name!r} is missing.")
        return tensors[name]

    bases: dict[str, SharedBasis] = {}
    for rec in structure["fips_linears"]:
        key = rec["basis"]
        if key not in bases:
            bases[key] = SharedBasis(need(key).float())
        bias = need(f"{rec['path']}.bias") if rec.get("bias") else None
        mod = FipsLinear.from_packed(bases[key], need(f"{rec['path']}.values"), need(f"{rec['path']}.mask"),
                                     tuple(rec["shape"]), rec["orientation"], bias)
        get_submodule(model, rec["path"])  # path must exist in this architecture
        set_submodule(model, rec["path"], mod)
    shared: dict[str, nn.Parameter] = {}
    for rec in structure["delta_linears"]:
        key = rec["shared"]
        if key not in shared:
            shared[key] = nn.Parameter(need(key).float())
        bias = need(f"{rec['path']}.bias") if rec.get("bias") else None
        set_submodule(model, rec["path"], DeltaLinear(shared[key], need(f"{rec['path']}.A").float(),
                                                      need(f"{rec['path']}.B").float(), bias))
    state = model.state_dict()
    replaced = [r["path"] for r in structure["fips_linears"] + structure["delta_linears"]]
    load = {}
    for name in state:
        if any(name.startswith(p + ".") for p in replaced):
            continue
        src = structure["aliases"].get(name, name)
        if src in tensors:
            load[name] = tensors[src]
    missing = [n for n in state if n not in load and not any(n.startswith(p + ".") for p in replaced)]
    persistent_missing = [n for n in missing if not n.endswith(("inv_freq", "position_ids"))]
    if persistent_missing:
        raise CheckpointError(f"{path} is incomplete: tensor {persistent_missing[0]!r} is missing.")
    model.load_state_dict(load, strict=False)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=tok, adapter=adapter_for(model), source=source,
                     name=header.get("name", str(path)), extra=dict(header.get("extra", {})))
    lm.extra["checkpoint_header"] = header
    return lm
