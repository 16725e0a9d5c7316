"""The export contract: the schema of ``fips_config.json``, written by the exporter, read by the runtime.

One typed, versioned record (frozen dataclasses, standard library only: no torch, no onnx). The
exporter builds an :class:`ExportContract` and writes ``contract.to_json()``; the runtime reads the
file with :func:`read_contract`, which is strict: an unknown ``format`` or ``format_version``, a
missing key, a key of the wrong type or an unknown key is refused with one line naming it. There is
no fuzzy lookup anywhere: a value lives under exactly one name.

Layout (format ``fips-rt-onnx``, version 2; documented in docs/export.md): the common keys at the
top level, plus the keys of the model kind (:class:`CausalLMSpec`, :class:`EncoderSpec`,
:class:`VisionSpec`) at the top level too. Version 2 added ``quantization`` (:class:`QuantizationInfo`:
the weight format of ``fips export --weights``), ``session`` (:class:`SessionHints`: the session options
the file wants, e.g. prepacking for MatMulNBits files) and ``sparse_op.quantized_nodes``; version-1
files are still read (as fp32/fp16 weights, prepacking off, no quantized sparse nodes).

Model kinds are named once, here: ``causal-lm``, ``encoder``, ``vit``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fips_rt.errors import FipsError

FORMAT = "fips-rt-onnx"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
CONFIG_FILE = "fips_config.json"
MAX_CONFIG_BYTES = 16 << 20  # a contract is a few KB; refuse anything absurd before parsing it

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
VIT = "vit"
KINDS = (CAUSAL_LM, ENCODER, VIT)
METHODS = ("dense", "fips", "deltallm")
DTYPES = ("fp32", "fp16")
SPARSE_OP_VERSIONS = (1,)  # versions of fips.SparseMatMul this runtime runs
WEIGHTS = ("fp32", "fp16", "int8", "int4")  # fips export --weights
QUANTIZED_WEIGHTS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes (powers of two >= 16)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level (0: unset)
EMBEDDINGS = ("dense", "gather-block-quantized", "shared-with-head")


class ContractError(FipsError, ValueError):
    """``fips_config.json`` does not follow the contract (the message is one line for the user)."""


# ------------------------------------------------------------------------------------------ checks
_INT_MAX = 2 ** 62


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _int(v: Any, where: str, *, lo: int = 0, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError(f"{where} must be an integer{' or null' if optional else ''}, got {_type_name(v)}")
    if not lo <= v <= _INT_MAX:
        raise ContractError(f"{where} = {v} is out of range (must lie in [{lo}, 2**62])")
    return v


def _str(v: Any, where: str, *, optional: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ContractError(f"{where} must be a string{' or null' if optional else ''}, got {_type_name(v)}")
    if choices is not None and v not in choices:
        raise ContractError(f"{where} = {v!r} is not one of {', '.join(choices)}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ContractError(f"{where} must be true or false, got {_type_name(v)}")
    return v


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise ContractError(f"{where} must be an object, got {_type_name(v)}")
    return v


def _list(v: Any, where: str, *, optional: bool = False) -> list | None:
    if v is None and optional:
        return None
    if not isinstance(v, list):
        raise ContractError(f"{where} must be a list{' or null' if optional else ''}, got {_type_name(v)}")
    return v


def _file_name(v: Any, where: str, *, optional: bool = False) -> str | None:
    """A plain file name inside the model folder (no folders, no '..')."""
    name = _str(v, where, optional=optional)
    if name is None:
        return None
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ContractError(f"{where} = {name!r} must be a plain file name inside the model folder")
    return name


class _Reader:
    """Takes keys out of one JSON object; ``done()`` refuses whatever is left (unknown keys)."""

    def __init__(self, d: Any, where: str):
        self.d = dict(_dict(d, where))
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str) -> Any:
        if name not in self.d:
            raise ContractError(f"{CONFIG_FILE}: missing key {self.key(name)!r}")
        return self.d.pop(name)

    def done(self) -> None:
        if self.d:
            raise ContractError(f"{CONFIG_FILE}: unknown key {self.key(sorted(self.d)[0])!r} "
                                f"(written by a newer fips-rt? this runtime reads format version "
                                f"{', '.join(map(str, SUPPORTED_VERSIONS))})")


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints, or names of symbolic axes)."""
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def read(cls, v: Any, where: str) -> "TensorSpec":
        r = _Reader(v, where)
        name = _str(r.take("name"), r.key("name"))
        dtype = _str(r.take("dtype"), r.key("dtype"))
        shape = []
        for j, d in enumerate(_list(r.take("shape"), r.key("shape"))):
            if isinstance(d, str):
                shape.append(d)
            else:
                shape.append(_int(d, f"{r.key('shape')}[{j}]"))
        r.done()
        return cls(name, dtype, tuple(shape))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SparseOpInfo:
    domain: str = "fips"
    op_type: str = "SparseMatMul"
    version: int = 1
    nodes: int = 0
    bases: int = 0
    quantized_nodes: int = 0  # fips.QSparseMatMul nodes (format version >= 2)

    @classmethod
    def read(cls, v: Any, where: str, format_version: int = FORMAT_VERSION) -> "SparseOpInfo":
        r = _Reader(v, where)
        out = cls(domain=_str(r.take("domain"), r.key("domain"), choices=("fips",)),
                  op_type=_str(r.take("op_type"), r.key("op_type"), choices=("SparseMatMul",)),
                  version=_int(r.take("version"), r.key("version"), lo=1),
                  nodes=_int(r.take("nodes"), r.key("nodes")),
                  bases=_int(r.take("bases"), r.key("bases")),
                  quantized_nodes=(_int(r.take("quantized_nodes"), r.key("quantized_nodes"))
                                   if format_version >= 2 else 0))
        r.done()
        if (out.nodes or out.quantized_nodes) and out.version not in SPARSE_OP_VERSIONS:
            raise ContractError(f"{CONFIG_FILE}: the model uses fips.SparseMatMul version {out.version}; this "
                                f"runtime runs version {', '.join(map(str, SPARSE_OP_VERSIONS))} (upgrade fips-rt)")
        return out

    def to_json(self, format_version: int = FORMAT_VERSION) -> dict:
        d = dataclasses.asdict(self)
        if format_version < 2:
            del d["quantized_nodes"]
        return d


@dataclass(frozen=True)
class QuantizationInfo:
    """How the weights are stored (``fips export --weights``), format version >= 2.

    ``weights``: fp32 / fp16 (float weights), int8 / int4 (every dense linear a ``com.microsoft.MatMulNBits``
    of onnxruntime.quantization's ``MatMulNBitsQuantizer`` with ``block_size`` and ``accuracy_level``; FiPS V
    through ``fips.QSparseMatMul`` with ``sparse_bits`` / ``sparse_group_size``; FiPS U in ``basis_weights``).
    ``embedding``: "dense" (a
    float table), "gather-block-quantized" (its own ``GatherBlockQuantized`` table) or "shared-with-head"
    (``GatherBlockQuantized`` reading the tied LM head's MatMulNBits tensors: one copy).
    """
    weights: str = "fp32"
    block_size: int | None = None
    accuracy_level: int | None = None
    embedding: str = "dense"
    matmul_nbits_nodes: int = 0
    basis_weights: str | None = None  # FiPS U (the basis products): "fp32" or "int8"; null without FiPS
    sparse_bits: int | None = None
    sparse_group_size: int | None = None
    quantizer: str | None = None

    def __post_init__(self):
        _check_quantization(self)

    @classmethod
    def read(cls, v: Any, where: str) -> "QuantizationInfo":
        r = _Reader(v, where)
        k = r.key
        out = dict(weights=_str(r.take("weights"), k("weights"), choices=WEIGHTS),
                   block_size=_int(r.take("block_size"), k("block_size"), lo=1, optional=True),
                   accuracy_level=_int(r.take("accuracy_level"), k("accuracy_level"), optional=True),
                   embedding=_str(r.take("embedding"), k("embedding"), choices=EMBEDDINGS),
                   matmul_nbits_nodes=_int(r.take("matmul_nbits_nodes"), k("matmul_nbits_nodes")),
                   basis_weights=_str(r.take("basis_weights"), k("basis_weights"), optional=True,
                                      choices=("fp32", "int8")),
                   sparse_bits=_int(r.take("sparse_bits"), k("sparse_bits"), optional=True),
                   sparse_group_size=_int(r.take("sparse_group_size"), k("sparse_group_size"), optional=True),
                   quantizer=_str(r.take("quantizer"), k("quantizer"), optional=True))
        r.done()
        return cls(**out)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _check_quantization(q: "QuantizationInfo") -> None:
    where = f"{CONFIG_FILE}: quantization"
    if q.weights not in WEIGHTS:
        raise ContractError(f"{where}.weights = {q.weights!r} is not one of {', '.join(WEIGHTS)}")
    if q.embedding not in EMBEDDINGS:
        raise ContractError(f"{where}.embedding = {q.embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    bits = QUANTIZED_WEIGHTS.get(q.weights)
    if bits is None:
        for name in ("block_size", "accuracy_level", "sparse_bits", "sparse_group_size", "basis_weights"):
            if getattr(q, name) is not None:
                raise ContractError(f"{where}.{name} must be null for {q.weights} weights")
        if q.matmul_nbits_nodes or q.embedding != "dense":
            raise ContractError(f"{where}: {q.weights} weights have no MatMulNBits nodes and a dense embedding")
        return
    if q.block_size not in BLOCK_SIZES:
        raise ContractError(f"{where}.block_size = {q.block_size!r} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if q.accuracy_level not in ACCURACY_LEVELS:
        raise ContractError(f"{where}.accuracy_level = {q.accuracy_level!r} is not one of "
                            f"{', '.join(map(str, ACCURACY_LEVELS))}")
    if q.sparse_bits is not None and q.sparse_bits != bits:
        raise ContractError(f"{where}.sparse_bits = {q.sparse_bits} disagrees with {q.weights} weights")
    if (q.sparse_bits is None) != (q.sparse_group_size is None):
        raise ContractError(f"{where}: sparse_bits and sparse_group_size are both set or both null")


@dataclass(frozen=True)
class SessionHints:
    """The onnxruntime session options the file wants (format version >= 2); the runtime applies them
    unless the user overrides (``--prepacking on|off``). MatMulNBits files want prepacking on: onnxruntime
    repacks their blocks at load into its kernels' layout (without it MatMulNBits takes a slow path)."""
    prepacking: bool = False

    @classmethod
    def read(cls, v: Any, where: str) -> "SessionHints":
        r = _Reader(v, where)
        out = cls(prepacking=_bool(r.take("prepacking"), r.key("prepacking")))
        r.done()
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KVNames:
    """Name patterns of one layer's cache tensors, ``{i}`` = layer index."""
    key: str
    value: str

    @classmethod
    def read(cls, v: Any, where: str) -> "KVNames":
        r = _Reader(v, where)
        out = cls(_str(r.take("key"), r.key("key")), _str(r.take("value"), r.key("value")))
        r.done()
        for name, pat in (("key", out.key), ("value", out.value)):
            if pat.count("{i}") != 1 or "{" in pat.replace("{i}", "") or "}" in pat.replace("{i}", ""):
                raise ContractError(f"{where}.{name} = {pat!r} must contain '{{i}}' exactly once")
        return out

    def names(self, layer: int) -> tuple[str, str]:
        return self.key.replace("{i}", str(layer)), self.value.replace("{i}", str(layer))


@dataclass(frozen=True)
class CausalLMSpec:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    sliding_windows: tuple[int | None, ...] | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    chat_template: bool
    last_logits_only: bool
    past_key_values: KVNames = KVNames("past_key_values.{i}.key", "past_key_values.{i}.value")
    present: KVNames = KVNames("present.{i}.key", "present.{i}.value")

    KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "sliding_windows", "eos_token_ids", "bos_token_id", "pad_token_id",
            "chat_template", "last_logits_only", "past_key_values", "present", "kv_cache_shape")

    @classmethod
    def read(cls, r: _Reader) -> "CausalLMSpec":
        k = r.key
        ints = {n: _int(r.take(n), k(n), lo=1) for n in ("num_layers", "hidden_size", "num_attention_heads",
                                                         "num_kv_heads", "head_dim", "vocab_size")}
        mpe = _int(r.take("max_position_embeddings"), k("max_position_embeddings"), lo=1, optional=True)
        sw = _list(r.take("sliding_windows"), k("sliding_windows"), optional=True)
        if sw is not None:
            if len(sw) != ints["num_layers"]:
                raise ContractError(f"{CONFIG_FILE}: sliding_windows has {len(sw)} entries for "
                                    f"{ints['num_layers']} layers")
            sw = tuple(_int(w, f"{k('sliding_windows')}[{j}]", lo=1, optional=True) for j, w in enumerate(sw))
        eos = tuple(_int(e, f"{k('eos_token_ids')}[{j}]")
                    for j, e in enumerate(_list(r.take("eos_token_ids"), k("eos_token_ids"))))
        out = cls(**ints, max_position_embeddings=mpe, sliding_windows=sw, eos_token_ids=eos,
                  bos_token_id=_int(r.take("bos_token_id"), k("bos_token_id"), optional=True),
                  pad_token_id=_int(r.take("pad_token_id"), k("pad_token_id"), optional=True),
                  chat_template=_bool(r.take("chat_template"), k("chat_template")),
                  last_logits_only=_bool(r.take("last_logits_only"), k("last_logits_only")),
                  past_key_values=KVNames.read(r.take("past_key_values"), k("past_key_values")),
                  present=KVNames.read(r.take("present"), k("present")))
        shape = _list(r.take("kv_cache_shape"), k("kv_cache_shape"))
        if shape != out.kv_cache_json():
            raise ContractError(f"{CONFIG_FILE}: kv_cache_shape {shape} disagrees with num_kv_heads/head_dim "
                                f"({out.kv_cache_json()})")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(out, name)
            if v is not None and v >= out.vocab_size:
                raise ContractError(f"{CONFIG_FILE}: {name} = {v} is not below vocab_size {out.vocab_size}")
        if any(e >= out.vocab_size for e in eos):
            raise ContractError(f"{CONFIG_FILE}: an eos_token_ids entry is not below vocab_size {out.vocab_size}")
        return out

    def kv_cache_json(self) -> list:
        return ["batch_size", self.num_kv_heads, "past_sequence_length", self.head_dim]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sliding_windows"] = None if self.sliding_windows is None else list(self.sliding_windows)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["past_key_values"] = dataclasses.asdict(self.past_key_values)
        d["present"] = dataclasses.asdict(self.present)
        d["kv_cache_shape"] = self.kv_cache_json()
        return d


@dataclass(frozen=True)
class EncoderSpec:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int | None
    pooling: str = "mean"
    embedding_output: str = "sentence_embedding"

    KEYS = ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
            "pooling", "embedding_output")

    @classmethod
    def read(cls, r: _Reader) -> "EncoderSpec":
        k = r.key
        return cls(hidden_size=_int(r.take("hidden_size"), k("hidden_size"), lo=1),
                   num_layers=_int(r.take("num_layers"), k("num_layers"), lo=1),
                   num_attention_heads=_int(r.take("num_attention_heads"), k("num_attention_heads"), lo=1),
                   vocab_size=_int(r.take("vocab_size"), k("vocab_size"), lo=1),
                   max_position_embeddings=_int(r.take("max_position_embeddings"), k("max_position_embeddings"),
                                                lo=1, optional=True),
                   pooling=_str(r.take("pooling"), k("pooling"), choices=("mean",)),
                   embedding_output=_str(r.take("embedding_output"), k("embedding_output")))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class VisionSpec:
    image_size: tuple[int, int, int]
    num_classes: int | None
    preprocessing: dict = field(default_factory=dict)

    KEYS = ("image_size", "num_classes", "preprocessing")

    @classmethod
    def read(cls, r: _Reader) -> "VisionSpec":
        k = r.key
        size = _list(r.take("image_size"), k("image_size"))
        if len(size) != 3:
            raise ContractError(f"{CONFIG_FILE}: image_size must be [C, H, W], got {size}")
        size = tuple(_int(s, f"{k('image_size')}[{j}]", lo=1) for j, s in enumerate(size))
        pre = _dict(r.take("preprocessing"), k("preprocessing"))
        for key, v in pre.items():
            if key not in _PREPROCESSING_KEYS:
                raise ContractError(f"{CONFIG_FILE}: unknown key 'preprocessing.{key}'")
            if key in ("mean", "std"):
                vals = _list(v, f"preprocessing.{key}")
                if len(vals) != size[0] or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   and math.isfinite(x) for x in vals):
                    raise ContractError(f"{CONFIG_FILE}: preprocessing.{key} must be {size[0]} finite numbers")
        return cls(size, _int(r.take("num_classes"), k("num_classes"), lo=1, optional=True), dict(pre))

    def to_json(self) -> dict:
        return {"image_size": list(self.image_size), "num_classes": self.num_classes,
                "preprocessing": dict(self.preprocessing)}


_KIND_SPECS = {CAUSAL_LM: CausalLMSpec, ENCODER: EncoderSpec, VIT: VisionSpec}


@dataclass(frozen=True)
class ExportContract:
    """Everything the runtime needs to know about an exported model folder."""
    model_file: str
    external_data: str | None
    kind: str
    family: str
    architecture: str
    model_type: str | None
    name: str
    method: str
    dtype: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sparse_op: SparseOpInfo
    spec: CausalLMSpec | EncoderSpec | VisionSpec
    exporter: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quantization: QuantizationInfo = QuantizationInfo()
    session: SessionHints = SessionHints()

    def __post_init__(self):
        want = _KIND_SPECS.get(self.kind)
        if want is None or not isinstance(self.spec, want):
            raise ContractError(f"kind {self.kind!r} needs a {want.__name__ if want else 'known kind'} record")
        q = self.quantization
        if q.weights in ("fp32", "fp16") and q.weights != self.dtype:
            raise ContractError(f"{CONFIG_FILE}: quantization.weights = {q.weights!r} disagrees with dtype "
                                f"{self.dtype!r}")
        if q.weights in QUANTIZED_WEIGHTS and self.dtype != "fp32":
            raise ContractError(f"{CONFIG_FILE}: {q.weights} weights compute in fp32 (dtype {self.dtype!r} given)")
        if self.sparse_op.quantized_nodes and q.sparse_bits is None:
            raise ContractError(f"{CONFIG_FILE}: sparse_op.quantized_nodes > 0 needs quantization.sparse_bits")

    @property
    def causal_lm(self) -> CausalLMSpec | None:
        return self.spec if isinstance(self.spec, CausalLMSpec) else None

    @property
    def encoder(self) -> EncoderSpec | None:
        return self.spec if isinstance(self.spec, EncoderSpec) else None

    @property
    def vision(self) -> VisionSpec | None:
        return self.spec if isinstance(self.spec, VisionSpec) else None

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": self.format_version, "model_file": self.model_file,
                "external_data": self.external_data, "kind": self.kind, "family": self.family,
                "architecture": self.architecture, "model_type": self.model_type, "name": self.name,
                "method": self.method, "dtype": self.dtype, "opset": self.opset,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "sparse_op": self.sparse_op.to_json(self.format_version), **self.spec.to_json(),
                "exporter": dict(self.exporter),
                **({"quantization": self.quantization.to_json(), "session": self.session.to_json()}
                   if self.format_version >= 2 else {})}

    @classmethod
    def from_json(cls, d: Any) -> "ExportContract":
        r = _Reader(d, "")
        fmt = r.take("format")
        if fmt != FORMAT:
            raise ContractError(f"{CONFIG_FILE}: format {fmt!r} is not {FORMAT!r} (not a fips-rt export)")
        version = r.take("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
            raise ContractError(f"{CONFIG_FILE}: format_version {version!r} is not one this runtime reads "
                                f"({', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade fips-rt or re-export")
        kind = _str(r.take("kind"), "kind", choices=KINDS)
        common = dict(
            model_file=_file_name(r.take("model_file"), "model_file"),
            external_data=_file_name(r.take("external_data"), "external_data", optional=True),
            kind=kind,
            family=_str(r.take("family"), "family"),
            architecture=_str(r.take("architecture"), "architecture"),
            model_type=_str(r.take("model_type"), "model_type", optional=True),
            name=_str(r.take("name"), "name"),
            method=_str(r.take("method"), "method", choices=METHODS),
            dtype=_str(r.take("dtype"), "dtype", choices=DTYPES),
            opset=_int(r.take("opset"), "opset", lo=1),
            inputs=tuple(TensorSpec.read(v, f"inputs[{j}]") for j, v in enumerate(_list(r.take("inputs"), "inputs"))),
            outputs=tuple(TensorSpec.read(v, f"outputs[{j}]")
                          for j, v in enumerate(_list(r.take("outputs"), "outputs"))),
            sparse_op=SparseOpInfo.read(r.take("sparse_op"), "sparse_op", version),
            exporter=_dict(r.take("exporter"), "exporter"),
            format_version=version,
        )
        if version >= 2:
            common["quantization"] = QuantizationInfo.read(r.take("quantization"), "quantization")
            common["session"] = SessionHints.read(r.take("session"), "session")
        else:  # version 1: float weights, the session defaults of its time
            common["quantization"] = QuantizationInfo(weights=common["dtype"])
        spec = _KIND_SPECS[kind].read(r)
        r.done()
        return cls(**common, spec=spec)


# ------------------------------------------------------------------------------------------ files
def read_contract(model_dir: str | os.PathLike) -> ExportContract | None:
    """The contract of an export folder; ``None`` when the folder has no ``fips_config.json`` (an ONNX
    file made elsewhere: the runtime then works from the graph's own inputs and outputs)."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ContractError(f"{path} is {size} bytes; a {CONFIG_FILE} is a few KB (refused)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ContractError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ContractError(f"{path} is not readable JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        return ExportContract.from_json(data)
    except ContractError as e:
        msg = str(e)
        raise ContractError(msg if msg.startswith(CONFIG_FILE) else f"{CONFIG_FILE}: {msg}") from None


def write_contract(contract: ExportContract, folder: str | os.PathLike) -> Path:
    """Write ``fips_config.json`` into ``folder`` (the exporter's staging folder) after re-reading the
    record through :meth:`ExportContract.from_json`, so a writer bug can never produce a file the
    runtime refuses."""
    data = contract.to_json()
    ExportContract.from_json(json.loads(json.dumps(data)))
    path = Path(folder) / CONFIG_FILE
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
