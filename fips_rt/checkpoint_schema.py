"""What a ``model.pt`` may contain, as small pure checks (the loader in checkpoint.py orchestrates).

A checkpoint is hostile until proven otherwise: the seal only proves the bytes were not changed
after sealing, anyone can seal. Every check here raises :class:`CheckpointError` with one line that
names the offending entry (``source.config.vocab_size``, ``structure.fips_linears[3].shape``,
``tensors['model.norm.weight']``, ``tokenizer_files['x.py']``). Nothing here imports torch.

Order of the loader: plain-JSON header -> header fields -> source (class / timm name and kwargs,
config bounds) -> structure records -> tokenizer file names and sizes; then, against an architecture
built on the ``meta`` device (no memory), every expected shape and dtype is compared with the tensors
present, and the rebuilt model's bytes are bounded by the file's bytes, before anything real is built.
"""
from __future__ import annotations

import json
import math
import re

from .errors import CheckpointError

MAX_DEPTH = 32  # nesting of the header's JSON values
MAX_LAYERS = 1024  # blocks of one model (the largest real models have ~130)
MAX_HEADS = 4096
MAX_INT = 2 ** 31 - 1  # every size (the sparse op indexes with int32)
MAX_NAME = 512  # characters of a tensor name / module path
MAX_TOKENIZER_FILE = 64 << 20
MAX_TOKENIZER_TOTAL = 256 << 20
# bytes of the rebuilt model per byte of the file: a packed mask bit becomes a float32 of V (4 B)
# and a bool of the mask (1 B): 40x; tied weights at most double the rest.
AMPLIFICATION = 48
SLACK_BYTES = 64 << 20  # non-persistent buffers (rotary tables, position ids, attention masks)

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")
HEADER_TYPES = {"method": str, "config": dict, "source": dict, "structure": dict, "family": str, "kind": str,
                "name": str, "report": dict, "versions": dict, "extra": dict}
HEADER_REQUIRED = ("method", "config", "source", "structure")
FIPS_KEYS = {"path", "orientation", "basis", "shape", "nnz", "bias"}
DELTA_KEYS = {"path", "shared", "rank", "bias"}  # + optional "scale" (DeltaLinear.scale, default 1)
MAX_SCALE = 1e6
_METHOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_BASIS = re.compile(r"^basis\.[0-9]{1,9}$")
_SHARED = re.compile(r"^shared\.[0-9]{1,9}$")
_CONFIG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
_CONFIG_REFUSED = ("auto_map", "quantization_config")
# HF config entries whose value is a count of modules or heads: bounded before anything is built
_HF_COUNTS = {"num_hidden_layers": (1, MAX_LAYERS), "num_attention_heads": (1, MAX_HEADS),
              "num_key_value_heads": (1, MAX_HEADS)}
_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "head_dim", "max_position_embeddings",
             "type_vocab_size")


def show(value, limit: int = 60) -> str:
    """A hostile value, printable on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def refuse(entry: str, problem: str) -> CheckpointError:
    return CheckpointError(one_line(f"{entry}: {problem}"))


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(v, entry: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if not is_int(v):
        raise refuse(entry, f"must be an integer, not {type(v).__name__} {show(v)}")
    if not lo <= v <= hi:
        raise refuse(entry, f"{v} is outside [{lo}, {hi}]")
    return v


# ---------------------------------------------------------------- plain JSON
def check_plain_json(value, entry: str = "header") -> None:
    """Only dict (str keys) / list / str / int / float / bool / None, nested at most MAX_DEPTH deep
    (iterative: a deep nest cannot exhaust the stack)."""
    stack = [(value, entry, 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise refuse(where, f"nested deeper than {MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, int, float, str)):
            continue
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise refuse(where, f"has a key of type {type(k).__name__} ({show(k)}); keys are strings")
                stack.append((item, f"{where}.{k}" if len(where) < 200 else where, depth + 1))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                stack.append((item, f"{where}[{i}]" if len(where) < 200 else where, depth + 1))
        else:
            raise refuse(where, f"has type {type(v).__name__}; a checkpoint header holds only JSON values")


# ---------------------------------------------------------------- header
def check_header(header) -> None:
    if not isinstance(header, dict):
        raise refuse("header", f"must be a dict, not {type(header).__name__}")
    check_plain_json(header)
    for key in HEADER_REQUIRED:
        if key not in header:
            raise refuse("header", f"has no {key!r} entry")
    for key, typ in HEADER_TYPES.items():
        if key in header and not isinstance(header[key], typ):
            raise refuse(f"header.{key}", f"must be a {typ.__name__}, not {type(header[key]).__name__}")
    if not _METHOD.fullmatch(header["method"]):
        raise refuse("header.method", f"{show(header['method'])} is not a method name")
    name = header.get("name", "")
    if len(name) > 4096 or not name.isprintable():
        raise refuse("header.name", "must be a printable name of at most 4096 characters")
    report = header.get("report", {})
    if report.get("eval") is not None and not isinstance(report["eval"], dict):
        raise refuse("header.report.eval", f"must be a dict, not {type(report['eval']).__name__}")
    size = header.get("extra", {}).get("image_size")
    if size is not None:
        check_image_size(size, "header.extra.image_size")
    check_structure(header["structure"])


def check_image_size(size, entry: str) -> list[int]:
    if not isinstance(size, list) or len(size) != 3:
        raise refuse(entry, f"must be [channels, height, width], not {show(size)}")
    check_int(size[0], f"{entry}[0]", 1, 64)
    for i in (1, 2):
        check_int(size[i], f"{entry}[{i}]", 1, 4096)
    return list(size)


# ---------------------------------------------------------------- source
def check_hf_source(source: dict, classes: tuple[str, ...]) -> None:
    """Class from the adapters' list; config keys plain, ints in range, counts bounded."""
    for key in ("class", "config"):
        if key not in source:
            raise refuse("source", f"has no {key!r} entry")
    cls = source["class"]
    if not isinstance(cls, str) or cls not in classes:
        raise refuse("source.class", f"{show(cls)} is not a supported architecture ({', '.join(classes)})")
    cfg = source["config"]
    if not isinstance(cfg, dict):
        raise refuse("source.config", f"must be a dict, not {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type"), str):
        raise refuse("source.config.model_type", "must be a string")
    for key in cfg:
        if not _CONFIG_KEY.fullmatch(key) or key in _CONFIG_REFUSED:
            raise refuse(f"source.config.{key[:64]}", "is not an allowed configuration entry")
    check_config_ints(cfg, "source.config")
    for key, (lo, hi) in _HF_COUNTS.items():
        if cfg.get(key) is not None:
            check_int(cfg[key], f"source.config.{key}", lo, hi)
    for key in _HF_SIZES:
        if cfg.get(key) is not None:
            check_int(cfg[key], f"source.config.{key}", 1)
    if "num_hidden_layers" not in cfg:
        raise refuse("source.config", "has no 'num_hidden_layers' entry")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise refuse("source.config.num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    if heads is not None and cfg.get("head_dim") is None and cfg.get("hidden_size") is not None \
            and cfg["hidden_size"] % heads:
        raise refuse("source.config.num_attention_heads", f"{heads} does not divide hidden_size {cfg['hidden_size']}")
    lt = cfg.get("layer_types")
    if lt is not None and (not isinstance(lt, list) or len(lt) != cfg["num_hidden_layers"]
                           or not all(isinstance(t, str) for t in lt)):
        raise refuse("source.config.layer_types", "must list one string per layer (num_hidden_layers)")


def check_config_ints(value, entry: str) -> None:
    """Every integer anywhere in a model config lies in [-2**31, 2**31)."""
    stack = [(value, entry)]
    while stack:
        v, where = stack.pop()
        if is_int(v) and not -MAX_INT - 1 <= v <= MAX_INT:
            raise refuse(where, f"{show(v)} is out of range")
        if isinstance(v, dict):
            stack += [(item, f"{where}.{k}") for k, item in v.items()]
        elif isinstance(v, list):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(v)]


def _int_or_pair(v, entry: str, lo: int, hi: int):
    if isinstance(v, list):
        if len(v) != 2:
            raise refuse(entry, f"must be an integer or a pair, not {show(v)}")
        return [check_int(x, f"{entry}[{i}]", lo, hi) for i, x in enumerate(v)]
    return check_int(v, entry, lo, hi)


def _int_list(v, entry: str, lo: int, hi: int):
    if is_int(v):
        return check_int(v, entry, lo, hi)
    if not isinstance(v, list) or not 1 <= len(v) <= 8:
        raise refuse(entry, f"must be an integer or a list of at most 8, not {show(v)}")
    return [check_int(x, f"{entry}[{i}]", lo, hi) for i, x in enumerate(v)]


def _positive_number(v, entry: str, hi: float):
    if not is_num(v) or not 0 < v <= hi:
        raise refuse(entry, f"must be a number in (0, {hi}], not {show(v)}")
    return v


def _bool(v, entry: str):
    if not isinstance(v, bool):
        raise refuse(entry, f"must be true or false, not {show(v)}")
    return v


# name -> checker(value, entry) returning the value to pass to timm
TIMM_KWARGS = {
    "img_size": lambda v, e: _int_or_pair(v, e, 1, 4096),
    "patch_size": lambda v, e: _int_or_pair(v, e, 1, 1024),
    "in_chans": lambda v, e: check_int(v, e, 1, 64),
    "num_classes": lambda v, e: check_int(v, e, 0, 1_000_000),
    "embed_dim": lambda v, e: check_int(v, e, 1, 65536),
    "depth": lambda v, e: check_int(v, e, 1, MAX_LAYERS),
    "num_heads": lambda v, e: _int_list(v, e, 1, MAX_HEADS),
    "depths": lambda v, e: _int_list(v, e, 0, MAX_LAYERS),
    "window_size": lambda v, e: _int_or_pair(v, e, 1, 1024),
    "mlp_ratio": lambda v, e: _positive_number(v, e, 64.0),
    "qkv_bias": _bool,
}


def check_timm_source(source: dict, known_names) -> dict:
    """The timm name must be one timm lists; kwargs from the allow-list with their types and ranges.
    Returns the kwargs to pass (lists of per-stage values as tuples)."""
    name = source.get("name")
    if not isinstance(name, str) or name not in known_names:
        raise refuse("source.name", f"{show(name)} is not a timm model name")
    kwargs = source.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise refuse("source.kwargs", f"must be a dict, not {type(kwargs).__name__}")
    out = {}
    for key, value in kwargs.items():
        if key not in TIMM_KWARGS:
            raise refuse(f"source.kwargs.{key[:64]}", f"is not an allowed timm argument ({', '.join(TIMM_KWARGS)})")
        v = TIMM_KWARGS[key](value, f"source.kwargs.{key}")
        out[key] = tuple(v) if isinstance(v, list) else v
    depths = out.get("depths")
    if isinstance(depths, tuple) and sum(depths) > MAX_LAYERS:
        raise refuse("source.kwargs.depths", f"more than {MAX_LAYERS} blocks in all")
    return out


# ---------------------------------------------------------------- structure
def check_module_path(path, entry: str) -> str:
    if not isinstance(path, str) or not path or len(path) > MAX_NAME:
        raise refuse(entry, f"must be a module path, not {show(path)}")
    for part in path.split("."):
        if not part or part.startswith("_") or not (part.isidentifier() or part.isdigit()):
            raise refuse(entry, f"{show(path)} is not a module path (component {show(part)})")
    return path


def check_structure(structure) -> None:
    if not isinstance(structure, dict):
        raise refuse("header.structure", f"must be a dict, not {type(structure).__name__}")
    for key, typ in (("fips_linears", list), ("delta_linears", list), ("aliases", dict)):
        if key not in structure:
            raise refuse("header.structure", f"has no {key!r} entry")
        if not isinstance(structure[key], typ):
            raise refuse(f"header.structure.{key}", f"must be a {typ.__name__}, not {type(structure[key]).__name__}")
    seen: set[str] = set()
    for i, rec in enumerate(structure["fips_linears"]):
        where = f"header.structure.fips_linears[{i}]"
        _record_keys(rec, FIPS_KEYS, where)
        check_module_path(rec["path"], f"{where}.path")
        if rec["orientation"] not in ("in", "out"):
            raise refuse(f"{where}.orientation", f"must be 'in' or 'out', not {show(rec['orientation'])}")
        if not isinstance(rec["basis"], str) or not _BASIS.fullmatch(rec["basis"]):
            raise refuse(f"{where}.basis", f"{show(rec['basis'])} is not a basis name (basis.<i>)")
        shape = rec["shape"]
        if not isinstance(shape, list) or len(shape) != 2:
            raise refuse(f"{where}.shape", f"must be [rank, columns], not {show(shape)}")
        r, cols = (check_int(s, f"{where}.shape[{j}]") for j, s in enumerate(shape))
        if r * cols > MAX_INT:
            raise refuse(f"{where}.shape", f"{r}x{cols} has more than 2**31-1 entries")
        check_int(rec["nnz"], f"{where}.nnz", 0, r * cols)
        _bool(rec["bias"], f"{where}.bias")
        _unique(rec["path"], seen, f"{where}.path")
    for i, rec in enumerate(structure["delta_linears"]):
        where = f"header.structure.delta_linears[{i}]"
        _record_keys(rec, DELTA_KEYS | ({"scale"} if isinstance(rec, dict) and "scale" in rec else set()), where)
        check_module_path(rec["path"], f"{where}.path")
        if not isinstance(rec["shared"], str) or not _SHARED.fullmatch(rec["shared"]):
            raise refuse(f"{where}.shared", f"{show(rec['shared'])} is not a shared-matrix name (shared.<i>)")
        check_int(rec["rank"], f"{where}.rank")
        _bool(rec["bias"], f"{where}.bias")
        if "scale" in rec:
            sc = rec["scale"]
            if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc) or abs(sc) > MAX_SCALE:
                raise refuse(f"{where}.scale", f"must be a finite number of magnitude <= {MAX_SCALE:g}, not {show(sc)}")
        _unique(rec["path"], seen, f"{where}.path")
    for name, src in structure["aliases"].items():
        where = f"header.structure.aliases[{show(name)}]"
        check_module_path(name, where)
        if not isinstance(src, str) or not src or len(src) > MAX_NAME:
            raise refuse(where, f"must name a stored tensor, not {show(src)}")


def _record_keys(rec, keys: set[str], where: str) -> None:
    if not isinstance(rec, dict):
        raise refuse(where, f"must be a dict, not {type(rec).__name__}")
    if set(rec) != keys:
        missing, extra = sorted(keys - set(rec)), sorted(set(rec) - keys)
        raise refuse(where, f"missing {missing}" if missing else f"unknown entries {[show(k) for k in extra]}")


def _unique(path: str, seen: set[str], entry: str) -> None:
    if path in seen:
        raise refuse(entry, f"{show(path)} is replaced twice")
    seen.add(path)


# ---------------------------------------------------------------- tokenizer files
def check_tokenizer_files(files) -> dict[str, bytes]:
    """Names from the allow-list only (no path, no code), bounded sizes, JSON files parse as objects.
    Returns the files to write, ``auto_map`` and file-path entries removed from tokenizer_config.json
    (the folder's own files are found by name; nothing may point elsewhere or at custom code)."""
    if not isinstance(files, dict):
        raise refuse("tokenizer_files", f"must be a dict, not {type(files).__name__}")
    total = 0
    out: dict[str, bytes] = {}
    for name, data in files.items():
        where = f"tokenizer_files[{show(name)}]"
        if not isinstance(name, str) or name not in TOKENIZER_NAMES:
            raise refuse(where, f"is not an allowed tokenizer file ({', '.join(TOKENIZER_NAMES)})")
        if not isinstance(data, bytes):
            raise refuse(where, f"must be bytes, not {type(data).__name__}")
        if len(data) > MAX_TOKENIZER_FILE:
            raise refuse(where, f"is larger than {MAX_TOKENIZER_FILE >> 20} MiB")
        total += len(data)
        if name in JSON_TOKENIZER_FILES or name.endswith((".txt", ".jinja")):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise refuse(where, "is not UTF-8 text") from None
        if name in JSON_TOKENIZER_FILES:
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                raise refuse(where, "is not valid JSON") from None
            if not isinstance(obj, dict):
                raise refuse(where, f"must hold a JSON object, not {type(obj).__name__}")
            if name == "tokenizer_config.json":
                data = tokenizer_config_bytes(obj, data, where)
        out[name] = data
    if total > MAX_TOKENIZER_TOTAL:
        raise refuse("tokenizer_files", f"hold more than {MAX_TOKENIZER_TOTAL >> 20} MiB")
    return out


_TOKENIZER_CLASS = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_TOKENIZER_BACKENDS = ("TokenizersBackend", "PythonBackend")  # transformers 5 names of generic classes


def is_tokenizer_class_name(cls) -> bool:
    return isinstance(cls, str) and bool(_TOKENIZER_CLASS.fullmatch(cls)) and (
        cls.endswith(("Tokenizer", "TokenizerFast")) or cls in _TOKENIZER_BACKENDS)


def tokenizer_config_bytes(cfg: dict, data: bytes, where: str) -> bytes:
    """tokenizer_config.json as written: a plain tokenizer class name; ``auto_map`` (custom code) and
    entries naming files (``*_file``: transformers finds the folder's own files by name) removed."""
    cls = cfg.get("tokenizer_class")
    if cls is not None and not is_tokenizer_class_name(cls):
        raise refuse(f"{where}.tokenizer_class", f"{show(cls)} is not a tokenizer class name")
    clean = {k: v for k, v in cfg.items()
             if k != "auto_map" and not k.endswith(("_file", "_files")) and k != "name_or_path"}
    return data if clean == cfg else json.dumps(clean, ensure_ascii=False).encode()


# ---------------------------------------------------------------- tensors against the architecture
def fips_expectations(orientation: str, weight_shape: tuple[int, int], rank: int) -> dict[str, tuple]:
    """Shapes of a FiPS linear replacing an nn.Linear of weight [out, in]: U [d, r], V [r, d_ff],
    the packed mask, the bias [out]. ``in`` (d -> d_ff): d = in; ``out`` (d_ff -> d): d = out."""
    out_f, in_f = weight_shape
    d, d_ff = (in_f, out_f) if orientation == "in" else (out_f, in_f)
    return {"U": (d, rank), "V": (rank, d_ff), "mask": ((rank * d_ff + 7) // 8,), "bias": (out_f,)}


def delta_expectations(weight_shape: tuple[int, int], rank: int) -> dict[str, tuple]:
    """Shapes of a DeltaLinear replacing an nn.Linear of weight [out, in]: shared [out, in], A [out, r],
    B [r, in], bias [out]."""
    out_f, in_f = weight_shape
    return {"shared": (out_f, in_f), "A": (out_f, rank), "B": (rank, in_f), "bias": (out_f,)}


def check_shape(actual, expected, entry: str, what: str = "") -> None:
    if tuple(actual) != tuple(expected):
        raise refuse(entry, f"has shape {list(actual)}; {what or 'this model'} needs {list(expected)}")


def model_bytes_bound(file_bytes: int) -> int:
    return AMPLIFICATION * int(file_bytes) + SLACK_BYTES
