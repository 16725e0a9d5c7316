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

The seal proves integrity, not origin: anyone can seal a file. So loading treats the content as
hostile: stored (uncompressed) archive members only; weights_only unpickling; the header checked
against the schema of ``fips_rt.checkpoint_schema`` (plain JSON, types, ranges, adapter classes, timm
names and kwargs, module paths, tokenizer file names); then every tensor the model will hold is
compared (shape, dtype; V vs U vs mask vs values) with the file against the architecture built on the
``meta`` device, and the model's bytes bounded by the file's, before anything real is allocated; the
rebuilt model runs one forward pass. Every refusal is one CheckpointError line naming the entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .errors import CheckpointError, FipsError

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
            rec = {"path": path, "shared": key, "rank": mod.rank, "bias": mod.bias is not None}
            if mod.scale != 1.0:  # DeltaConfig.anchor_scale="fit"; absent means 1 (files written before it)
                rec["scale"] = float(mod.scale)
            delta.append(rec)
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
    out = Path(path)
    if out.suffix != ".pt":
        raise CheckpointError(f"the checkpoint name must end in .pt (got {out.name}).")
    tensors, structure = collect_tensors(lm.model)
    return save_checkpoint_parts(path, lm, method, config, tensors, structure, report)


def save_checkpoint_parts(path: str | os.PathLike, lm, method: str, config: dict, tensors: dict, structure: dict,
                          report: dict | None = None) -> Path:
    """``save_checkpoint`` from tensors and structure assembled elsewhere (the block-by-block engine,
    fips_rt.streamed, which never holds the compressed model as modules); ``lm`` gives the source,
    adapter, name and tokenizer files."""
    import torch
    out = Path(path)
    if out.suffix != ".pt":
        raise CheckpointError(f"the checkpoint name must end in .pt (got {out.name}).")
    source = {k: v for k, v in lm.source.items() if k != "tokenizer_files"}
    header = {"method": method, "config": config, "source": source, "structure": structure,
              "family": lm.adapter.family, "kind": lm.adapter.kind, "name": lm.name,
              "report": report or {}, "versions": _versions(),
              "extra": {k: v for k, v in lm.extra.items() if k != "checkpoint_header"}}
    header = json.loads(json.dumps(header, default=str))  # plain types only: weights_only-loadable
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header,
           "tokenizer_files": dict(lm.source.get("tokenizer_files", {})), "tensors": tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    from .tempfiles import remove_stale_temporaries, temp_path
    remove_stale_temporaries(out)  # left by a killed earlier run
    tmp = temp_path(out)
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
TOP_KEYS = {"format": str, "format_version": int, "header": dict, "tokenizer_files": dict, "tensors": dict}
MAX_TENSORS = 1_000_000
ALLOWED_MISSING = ("inv_freq", "position_ids")  # buffers the architecture computes itself


class _Refusals:
    """Prefix every refusal raised inside with the file name (one line)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, CheckpointError) and not str(exc).startswith(str(self.path)):
            raise CheckpointError(f"{self.path}: {exc}") from None
        return False


class _ThirdParty:
    """Around code of other libraries that reads checkpoint content (transformers, timm, tokenizers):
    whatever they raise on a hostile value becomes one CheckpointError naming the entry. A Rust panic
    in tokenizers is a BaseException (pyo3 PanicException): caught too; interrupts are not."""

    def __init__(self, entry: str, what: str):
        self.entry, self.what = entry, what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, CheckpointError)):
            return False
        from .checkpoint_schema import refuse
        first = (str(exc).strip().splitlines() or [""])[0]
        raise refuse(self.entry, f"{self.what}: {type(exc).__name__}: {first}") from None


def _check_zip(path: Path) -> None:
    """The archive as torch.save writes it: stored (uncompressed) members whose sizes fit in the file;
    a deflated member could expand far beyond the file (a zip bomb) when torch reads it."""
    import zipfile
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a fips-rt checkpoint (not a readable archive: {e}).") from None
    if len(infos) > MAX_TENSORS + 16:
        raise CheckpointError(f"{path} is refused: its archive has {len(infos)} members.")
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{path} is refused: archive member {info.filename[:80]!r} is compressed "
                                  f"(torch.save stores every member).")
        total += info.file_size
    if total > size:
        raise CheckpointError(f"{path} is refused: its archive members claim more bytes than the file has.")


def _torch_load(path: Path):
    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the reader says about a hostile file: one line
        text = str(e)
        if "eights only" in text or "weights_only" in text or "WeightsUnpickler" in text:
            detail = next((ln.split("error:", 1)[1].split(" was not an allowed")[0].strip()
                           for ln in text.splitlines() if "WeightsUnpickler error:" in ln), "")
            raise CheckpointError(f"{path} is not a plain-tensor checkpoint: it holds objects other than tensors "
                                  f"and plain values, which fips-rt never unpickles"
                                  f"{f' ({detail[:160]})' if detail else ''}.") from None
        first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {first}") from None


def _check_tensors(tensors: dict) -> None:
    import torch

    from .checkpoint_schema import MAX_NAME, refuse, show
    if len(tensors) > MAX_TENSORS:
        raise refuse("tensors", f"{len(tensors)} tensors; at most {MAX_TENSORS}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
            raise refuse("tensors", f"has a key {show(name)} that is not a tensor name")
        if not isinstance(t, torch.Tensor):
            raise refuse(f"tensors[{show(name)}]", f"is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu" or t.is_complex():
            raise refuse(f"tensors[{show(name)}]",
                         f"is a {t.layout} {t.dtype} tensor; only dense real tensors are stored")
        if not t.is_contiguous():  # e.g. a stride-0 view: many elements, almost no bytes in the file
            raise refuse(f"tensors[{show(name)}]", f"is a strided view of shape {list(t.shape)}; tensors are "
                                                   f"stored contiguously")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Verify and read the checkpoint dict, its header checked against the schema
    (fips_rt.checkpoint_schema) and its tokenizer files against the allow-list (weights_only: nothing of
    the file is unpickled as code). Refusals are CheckpointError, one line."""
    from .checkpoint_schema import check_header, check_tokenizer_files
    p = Path(path)
    verify_file(p)
    _check_zip(p)
    with _Quiet():
        obj = _torch_load(p)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fips-rt checkpoint.")
    if obj.get("format_version") != FORMAT_VERSION or isinstance(obj.get("format_version"), bool):
        raise CheckpointError(f"{path} has checkpoint format version {str(obj.get('format_version'))[:20]}; this "
                              f"fips-rt reads version {FORMAT_VERSION}. Upgrade fips-rt or re-export.")
    with _Refusals(path):
        for key, typ in TOP_KEYS.items():
            if not isinstance(obj.get(key), typ):
                raise CheckpointError(f"entry {key!r} must be a {typ.__name__}, not {type(obj.get(key)).__name__}")
        check_header(obj["header"])
        _check_tensors(obj["tensors"])
        obj["tokenizer_files"] = check_tokenizer_files(obj["tokenizer_files"])
    return obj


def read_header(path: str | os.PathLike) -> dict:
    return read_checkpoint(path)["header"]


def _architecture(source: dict, tensors: dict, aliases: dict, device: str):
    """Check the source entry and build its architecture on ``device`` (``meta`` first: no memory)."""
    from . import models
    from .checkpoint_schema import (
        MAX_LAYERS,
        check_hf_source,
        check_timm_source,
        refuse,
    )
    kind = source.get("type")
    kwargs = None
    if kind == "hf":
        check_hf_source(source, models.hf_classes())
        expected = models.hf_model_type(source["class"])
        if source["config"]["model_type"] != expected:
            raise refuse("source.config.model_type", f"{source['config']['model_type']!r} does not match "
                                                     f"{source['class']} ({expected!r})")
        layers = source["config"]["num_hidden_layers"]
    elif kind == "timm":
        import timm
        kwargs = check_timm_source(source, set(timm.list_models()))
        layers = sum(kwargs["depths"]) if isinstance(kwargs.get("depths"), tuple) else kwargs.get("depth", 0)
    else:
        raise refuse("source.type", f"must be 'hf' or 'timm', not {str(kind)[:40]!r}")
    # a block holds at least one stored tensor (or alias): bounds what even the meta build costs
    if layers > min(MAX_LAYERS, len(tensors) + len(aliases)):
        raise refuse("source", f"{layers} blocks but the file stores only {len(tensors)} tensors")
    name = source.get("class") or source.get("name")
    with _ThirdParty("source", f"{name} cannot be built from this configuration"):
        return models.build_architecture(source, device=device, timm_kwargs=kwargs)


def _plan(meta, adapter, header: dict, tensors: dict, file_bytes: int) -> None:
    """Every tensor the rebuilt model will hold, compared (shape, dtype) with what the file stores,
    against the architecture built on the meta device; and the model's bytes bounded by the file's."""
    import torch
    from torch import nn

    from .adapters import block_paths, get_submodule, linear_paths
    from .checkpoint_schema import (
        check_shape,
        delta_expectations,
        fips_expectations,
        model_bytes_bound,
        refuse,
        show,
    )
    from .sparse_format import packed_mask_problem, popcount

    structure = header["structure"]
    fips_paths = {p: o for layer in linear_paths(meta, adapter) for p, o in layer}
    modules = dict(meta.named_modules())
    delta_paths = {f"{bp}.{n}" for stage in block_paths(meta, adapter) for bp in stage
                   for n, m in get_submodule(meta, bp).named_modules() if n and type(m) is nn.Linear}

    def stored(name: str, entry: str, kind: str = "float") -> torch.Tensor:
        if name not in tensors:
            raise refuse(entry, f"tensor {show(name)} is missing from the file")
        t = tensors[name]
        if kind == "float" and t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise refuse(f"tensors[{show(name)}]", f"must be floating point, not {t.dtype}")
        return t

    def linear(path: str, where: str, allowed) -> nn.Linear:
        if path not in allowed:
            raise refuse(where, f"{show(path)} is not a linear this method replaces in {type(meta).__name__}")
        mod = modules.get(path)
        if type(mod) is not nn.Linear:
            raise refuse(where, f"{show(path)} is not an nn.Linear of this model")
        return mod

    extra_bytes = 0
    bases: dict[str, tuple] = {}
    for i, rec in enumerate(structure["fips_linears"]):
        where = f"header.structure.fips_linears[{i}]"
        lin = linear(rec["path"], f"{where}.path", fips_paths)
        if rec["orientation"] != fips_paths[rec["path"]]:
            raise refuse(f"{where}.orientation", f"{rec['path']} is {fips_paths[rec['path']]!r} in this architecture")
        if rec["bias"] != (lin.bias is not None):
            raise refuse(f"{where}.bias", f"{rec['path']} {'has' if lin.bias is not None else 'has no'} bias")
        r, cols = rec["shape"]
        exp = fips_expectations(rec["orientation"], tuple(lin.weight.shape), r)
        check_shape(rec["shape"], exp["V"], f"{where}.shape", f"{rec['path']} (U rank {r})")
        U = stored(rec["basis"], f"{where}.basis")
        check_shape(U.shape, exp["U"], f"tensors[{show(rec['basis'])}]", f"U of {rec['path']}")
        bases[rec["basis"]] = tuple(U.shape)
        mask = stored(f"{rec['path']}.mask", f"{where}", kind="mask")
        if mask.dtype != torch.uint8:
            raise refuse(f"tensors['{rec['path']}.mask']", f"must be uint8, not {mask.dtype}")
        problem = packed_mask_problem(mask.numpy(), (r, cols))
        if problem:
            raise refuse(f"tensors['{rec['path']}.mask']", problem)
        values = stored(f"{rec['path']}.values", where)
        kept = popcount(mask.numpy())
        if values.dim() != 1 or values.numel() != kept:
            raise refuse(f"tensors['{rec['path']}.values']", f"has shape {list(values.shape)}; the mask keeps {kept}")
        if rec["nnz"] != kept:
            raise refuse(f"{where}.nnz", f"{rec['nnz']} but the mask keeps {kept}")
        if rec["bias"]:
            check_shape(stored(f"{rec['path']}.bias", where).shape, exp["bias"], f"tensors['{rec['path']}.bias']")
        extra_bytes += r * cols * 5 + (exp["bias"][0] * 4 if rec["bias"] else 0)
    extra_bytes += sum(a * b * 4 for a, b in bases.values())
    shared: set[str] = set()
    for i, rec in enumerate(structure["delta_linears"]):
        where = f"header.structure.delta_linears[{i}]"
        lin = linear(rec["path"], f"{where}.path", delta_paths)
        if rec["bias"] != (lin.bias is not None):
            raise refuse(f"{where}.bias", f"{rec['path']} {'has' if lin.bias is not None else 'has no'} bias")
        exp = delta_expectations(tuple(lin.weight.shape), rec["rank"])
        W = stored(rec["shared"], f"{where}.shared")
        check_shape(W.shape, exp["shared"], f"tensors[{show(rec['shared'])}]", f"the shared weight of {rec['path']}")
        for part in ("A", "B"):
            t = stored(f"{rec['path']}.{part}", where)
            check_shape(t.shape, exp[part], f"tensors['{rec['path']}.{part}']", f"rank {rec['rank']}")
        if rec["bias"]:
            check_shape(stored(f"{rec['path']}.bias", where).shape, exp["bias"], f"tensors['{rec['path']}.bias']")
        if rec["shared"] not in shared:
            shared.add(rec["shared"])
            extra_bytes += W.numel() * 4
        extra_bytes += (exp["A"][0] + exp["B"][1]) * rec["rank"] * 4 + (exp["bias"][0] * 4 if rec["bias"] else 0)

    replaced = tuple(r["path"] + "." for r in structure["fips_linears"] + structure["delta_linears"])
    state = meta.state_dict()
    aliases = structure["aliases"]
    for name in aliases:
        if name not in state or name.startswith(replaced):
            raise refuse(f"header.structure.aliases[{show(name)}]", "names no stored tensor of this model")
    for name, t in state.items():
        if name.startswith(replaced):
            continue
        src = aliases.get(name, name)
        if src not in tensors:
            if name.endswith(ALLOWED_MISSING):
                continue
            raise refuse(f"tensors[{show(src)}]", f"is missing from the file ({type(meta).__name__} needs "
                                                 f"{list(t.shape)} {str(t.dtype).replace('torch.', '')})")
        have = tensors[src]
        what = f"{name}" if src == name else f"{name} (alias of {src})"
        check_shape(have.shape, t.shape, f"tensors[{show(src)}]", what)
        if have.dtype != t.dtype:
            raise refuse(f"tensors[{show(src)}]", f"is {have.dtype}; {what} is {t.dtype}")

    kept_bytes = 0
    seen: set[int] = set()
    everything = list(meta.named_parameters(remove_duplicate=False)) + list(meta.named_buffers(remove_duplicate=False))
    for name, t in everything:
        if id(t) in seen or name.startswith(replaced):
            continue
        seen.add(id(t))
        kept_bytes += t.numel() * t.element_size()
    need = kept_bytes + extra_bytes
    if need > model_bytes_bound(file_bytes):
        raise refuse("header", f"the model it describes needs {need / 2**20:.0f} MiB, far more than the "
                               f"{file_bytes / 2**20:.1f} MiB file can hold")


def _smoke_input(model, kind: str, extra: dict):
    import torch
    if kind == "vit":
        size = extra.get("image_size")
        pe = getattr(model, "patch_embed", None)
        own = getattr(pe, "img_size", None)
        chans = getattr(getattr(pe, "proj", None), "in_channels", None)
        if own is not None and chans is not None:
            mine = [int(chans), int(own[0]), int(own[1])]
            if size is not None and list(size) != mine:
                from .checkpoint_schema import refuse
                raise refuse("header.extra.image_size", f"{list(size)} but the model takes {mine}")
            size = size or mine
        size = size or [3, 224, 224]
        return (torch.zeros(1, *size),), {}
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.tensor([[0, min(1, vocab - 1)]])
    kw = {"input_ids": ids}
    if kind == "encoder":
        kw["attention_mask"] = torch.ones_like(ids)
    return (), kw


def _check_tokenizer_class(files: dict) -> None:
    """A tokenizer_class named in tokenizer_config.json must be a tokenizer class of transformers
    itself (no fallback guess for unknown names, never custom code)."""
    import json

    import transformers

    from .checkpoint_schema import refuse
    if "tokenizer_config.json" not in files:
        return
    name = json.loads(files["tokenizer_config.json"]).get("tokenizer_class")
    if name is None:
        return
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise refuse("tokenizer_files['tokenizer_config.json'].tokenizer_class",
                     f"{name!r} is not a tokenizer class of transformers {transformers.__version__}")


class _Quiet:
    """Library warnings and log lines while a file is checked and built: a refusal stays one line."""

    def __enter__(self):
        import warnings
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging
            self._hf, self._level = hf_logging, hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            self._hf = None
        return self

    def __exit__(self, *exc):
        if self._hf is not None:
            self._hf.set_verbosity(self._level)
        self._warn.__exit__(*exc)
        return False


def load_checkpoint(path: str | os.PathLike):
    """Rebuild the compressed model (a ``LoadedModel``) from ``model.pt`` alone (see _load)."""
    with _Quiet():
        return _load(path)


def _load(path: str | os.PathLike):
    """Rebuild the compressed model (a ``LoadedModel``) from ``model.pt`` alone.

    Everything is checked before anything real is built (fips_rt.checkpoint_schema, then every shape
    against the architecture on the meta device); the model's forward pass runs once on a tiny input
    before it is returned. Any refusal is a CheckpointError of one line naming the offending entry."""
    import torch
    from torch import nn

    from .adapters import adapter_for, set_submodule
    from .checkpoint_schema import refuse
    from .models import LoadedModel, build_tokenizer
    from .modules import DeltaLinear, FipsLinear, SharedBasis

    obj = read_checkpoint(path)
    header, tensors = obj["header"], obj["tensors"]
    structure = header["structure"]
    with _Refusals(path):
        meta = _architecture(header["source"], tensors, structure["aliases"], "meta")
        try:
            adapter = adapter_for(meta)
        except FipsError as e:
            raise refuse("source", str(e)) from None
        for key in ("family", "kind"):
            if key in header and header[key] != getattr(adapter, key):
                raise refuse(f"header.{key}", f"{header[key][:40]!r} but the architecture is {getattr(adapter, key)!r}")
        _plan(meta, adapter, header, tensors, Path(path).stat().st_size)
        del meta
        model = _architecture(header["source"], tensors, structure["aliases"], "cpu")
        _check_tokenizer_class(obj["tokenizer_files"])
        with _ThirdParty("tokenizer_files", "the tokenizer cannot be loaded"):
            tok = build_tokenizer(obj["tokenizer_files"])
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if tok is not None and vocab is not None and len(tok) > int(vocab):
            raise refuse("tokenizer_files", f"the tokenizer has {len(tok)} tokens; the model's vocabulary {vocab}")

        bases: dict[str, SharedBasis] = {}
        for i, rec in enumerate(structure["fips_linears"]):
            key, p = rec["basis"], rec["path"]
            if key not in bases:
                bases[key] = SharedBasis(tensors[key].float())
            bias = tensors[f"{p}.bias"].float() if rec["bias"] else None
            try:
                mod = FipsLinear.from_packed(bases[key], tensors[f"{p}.values"], tensors[f"{p}.mask"],
                                             tuple(rec["shape"]), rec["orientation"], bias)
            except ValueError as e:
                raise refuse(f"header.structure.fips_linears[{i}]", str(e)) from None
            set_submodule(model, p, mod)
        shared: dict[str, nn.Parameter] = {}
        for rec in structure["delta_linears"]:
            key, p = rec["shared"], rec["path"]
            if key not in shared:
                shared[key] = nn.Parameter(tensors[key].float())
            bias = tensors[f"{p}.bias"].float() if rec["bias"] else None
            A, B = tensors[f"{p}.A"].float(), tensors[f"{p}.B"].float()
            set_submodule(model, p, DeltaLinear(shared[key], A, B, bias, scale=rec.get("scale", 1.0)))
        replaced = tuple(r["path"] + "." for r in structure["fips_linears"] + structure["delta_linears"])
        aliases = structure["aliases"]
        load = {}
        for name in model.state_dict():
            if name.startswith(replaced):
                continue
            src = aliases.get(name, name)
            if src in tensors:
                load[name] = tensors[src]
        with _ThirdParty("tensors", "the stored tensors do not fit the model"):
            model.load_state_dict(load, strict=False)
        model = model.float().eval()
        for prm in model.parameters():
            prm.requires_grad_(False)
        lm = LoadedModel(model=model, tokenizer=tok, adapter=adapter_for(model), source=dict(
            header["source"], tokenizer_files=obj["tokenizer_files"]), name=header.get("name", str(path)),
            extra=dict(header.get("extra", {})))
        args, kw = _smoke_input(model, adapter.kind, lm.extra)
        with _ThirdParty("header", "the rebuilt model fails on a two-token / one-image input"), torch.no_grad():
            model(*args, **kw)
    lm.extra["checkpoint_header"] = header
    return lm
