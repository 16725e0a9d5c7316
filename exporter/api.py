"""``export(model_or_checkpoint_or_spec, output_path, ...)``: write a dense or compressed model to ONNX.

Steps: resolve the input (a LoadedModel, an nn.Module, a fips-rt ``model.pt``, or a model spec),
refuse bad outputs before any work, build the graph with the architecture's export config, audit
it, write it atomically with its sidecars (tokenizer files, ``fips_config.json``), then check parity
against PyTorch in onnxruntime (CPU) unless ``verify=False``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

from fips_rt.errors import FipsError
from fips_rt.models import tokenizer_files

from .report import ExportReport
from .sparse_op import DOMAIN, DOMAIN_VERSION, OP_TYPE, Q_OP_TYPE
from .writer import AUTO_EXTERNAL_BYTES, data_file_name, write_export

DTYPES = ("fp32", "fp16")
WEIGHTS = ("fp32", "fp16", "int8", "int4")
QUANT_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits (the CLI offers 32 and 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# defaults per --weights (docs/export.md, "Quantized exports"): 4-bit needs small blocks for quality;
# accuracy level 4 (int8 compute in MatMulNBits) is the fastest on x86 CPUs
DEFAULT_BLOCK_SIZE = {"int8": 32, "int4": 32}
DEFAULT_ACCURACY_LEVEL = 4
MIN_OPSET = 17
CONFIG_FILE = "fips_config.json"


# ---------------------------------------------------------------------- input resolution
def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _input_paths(model, checkpoint: str | None) -> list[Path]:
    """The files or folders an export reads (never to be overwritten by it)."""
    paths = [Path(checkpoint)] if checkpoint else []
    if isinstance(model, (str, os.PathLike)):
        paths.append(Path(model))
    return paths


def _load(model, checkpoint: str | None):
    """A LoadedModel from whatever ``export`` was given."""
    from fips_rt.models import LoadedModel, load_model
    if isinstance(model, LoadedModel):
        return model
    if hasattr(model, "named_modules") and hasattr(model, "forward"):  # a bare nn.Module
        from fips_rt.adapters import adapter_for
        return LoadedModel(model=model.eval(), tokenizer=None, adapter=adapter_for(model), source={},
                           name=type(model).__name__)
    if not isinstance(model, (str, os.PathLike)):
        raise FipsError(f"Cannot export a {type(model).__name__}: give a model spec, a checkpoint path, "
                        f"a LoadedModel or an nn.Module.")
    p = Path(model)
    if p.suffix == ".pt" or (p.is_file() and p.suffix != ".gguf"):
        if not p.is_file():
            raise FipsError(f"Checkpoint not found: {model}")
        from fips_rt.checkpoint import load_checkpoint
        return load_checkpoint(p)
    return load_model(str(model), checkpoint=checkpoint)


def _check_output(out: Path, inputs: list[Path]) -> None:
    data = out.parent / data_file_name(out)
    for src in inputs:
        if _same(src, out) or _same(src, data) or src.resolve() == out.resolve():
            raise FipsError(f"Refusing to overwrite the input {src} with the export; choose another output name.")
        if src.is_dir() and _same(src, out.parent):
            raise FipsError(f"Refusing to write into the input model folder {src} (its tokenizer and config files "
                            f"would be replaced); choose another output folder.")
    if out.is_dir():
        raise FipsError(f"Output {out} is a folder; give a file name ending in .onnx.")
    if out.suffix != ".onnx":
        raise FipsError(f"The output must be an .onnx file (got {out.name}).")
    for parent in (out.parent, *out.parent.parents):  # a missing folder is created (after the checks)
        if parent.exists():
            if not parent.is_dir():
                raise FipsError(f"Cannot create the output folder {out.parent}: {parent} is a file.")
            break


# ---------------------------------------------------------------------- sidecars
def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's own files (``fips_rt.models.tokenizer_files``), plus what torch-free readers need."""
    if tokenizer is None:
        return {}
    files = tokenizer_files(tokenizer)
    if "special_tokens_map.json" not in files:
        smap = {k: (str(v) if not isinstance(v, (list, dict)) else v)
                for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
        files["special_tokens_map.json"] = json.dumps(smap, indent=2, ensure_ascii=False).encode()
    template = getattr(tokenizer, "chat_template", None)
    if template and "tokenizer_config.json" in files:  # keep the template where torch-free readers look first
        cfg = json.loads(files["tokenizer_config.json"])
        if not cfg.get("chat_template"):
            cfg["chat_template"] = template
            files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False).encode()
    return files


def _method(model) -> str:
    from fips_rt.modules import DeltaLinear, FipsLinear
    kinds = {type(m) for m in model.modules()}
    if FipsLinear in kinds:
        return "fips"
    if DeltaLinear in kinds:
        return "deltallm"
    return "dense"


def _versions() -> dict:
    import onnxruntime
    out = {"fips_rt": __import__("fips_rt").__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ---------------------------------------------------------------------- audit
def audit_graph(proto: onnx.ModelProto) -> dict:
    """What the tests and the report check: sparse nodes, bases, duplicated or transposed weights."""
    inits = {t.name: t for t in proto.graph.initializer}
    consumers: Counter = Counter(name for n in proto.graph.node for name in n.input if name in inits)
    by_hash: dict[str, list[str]] = {}
    for t in proto.graph.initializer:
        raw = t.raw_data
        if raw and len(raw) >= 4096:
            by_hash.setdefault(hashlib.sha1(raw).hexdigest(), []).append(t.name)
    # one U per group: "fips.basis.N" (float), "fips.basis.N_Q8" (MatMulNBits of x·U); the transposed
    # copies ("fips.basis.N.T", "fips.basis.N.T_Q8", for t·Uᵀ in quantized files) and scales are not bases
    bases = sorted(n for n in inits if n.startswith("fips.basis.") and ".T" not in n and not n.endswith("_scales")
                   and ".rowscale" not in n)
    return {
        "initializers": len(inits),
        "sparse_nodes": sum(1 for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE),
        "qsparse_nodes": sum(1 for n in proto.graph.node if n.domain == DOMAIN and n.op_type == Q_OP_TYPE),
        "matmul_nbits_nodes": sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits"),
        "gemm_nodes": sum(1 for n in proto.graph.node if n.op_type == "Gemm"),
        "bases": {b: consumers[b] for b in bases},
        "duplicate_initializers": [names for names in by_hash.values() if len(names) > 1],
        "transposed_initializers": sorted({n.input[0] for n in proto.graph.node
                                           if n.op_type == "Transpose" and n.input and n.input[0] in inits}),
    }


def _bytes_by_tag(proto: onnx.ModelProto, tags: dict[str, str]) -> dict[str, int]:
    out: Counter = Counter()
    for t in proto.graph.initializer:
        out[tags.get(t.name, "other")] += len(t.raw_data) if t.raw_data else t.ByteSize()
    return dict(out)


def _config_json(proto, config, lm, out: Path, method: str, audit: dict, external: bool, quant=None) -> dict:
    """The ``fips_config.json`` record, built as the typed contract (fips_rt.runtime.contract) the
    runtime reads strictly; ``write_contract``-style round trip so a writer bug fails here, not there."""
    from fips_rt.runtime.contract import ExportContract, QuantizationInfo, SessionHints, SparseOpInfo, TensorSpec

    def io(values):
        return tuple(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
                     for v in values)

    contract = ExportContract(
        model_file=out.name, external_data=data_file_name(out) if external else None,
        kind=config.kind, family=config.family, architecture=type(lm.model).__name__,
        model_type=getattr(getattr(lm.model, "config", None), "model_type", None),
        name=str(lm.name), method=method, dtype=config.dtype, opset=int(config.opset),
        inputs=io(proto.graph.input), outputs=io(proto.graph.output),
        sparse_op=SparseOpInfo(domain=DOMAIN, op_type=OP_TYPE, version=DOMAIN_VERSION,
                               nodes=int(audit["sparse_nodes"]), bases=len(audit["bases"]),
                               quantized_nodes=int(audit["qsparse_nodes"])),
        spec=config.contract_spec(), exporter=_versions(),
        quantization=quant or QuantizationInfo(weights=config.dtype),
        # MatMulNBits files want onnxruntime's prepacking (its blocks repacked at load for its kernels)
        session=SessionHints(prepacking=quant is not None and quant.matmul_nbits_nodes > 0))
    record = json.loads(json.dumps(contract.to_json(), default=str))
    ExportContract.from_json(record)  # the runtime's strict reader accepts what was written
    return record


def _validate(path: Path, config) -> list:
    """Run the written file in onnxruntime (CPU, the function-body path) against PyTorch."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - e.g. an opset newer than this onnxruntime
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FipsError(f"onnxruntime {ort.__version__} cannot load the exported {path.name} "
                        f"(opset {config.opset}): {first}") from None
    return config.validate(session)


# ---------------------------------------------------------------------- entry point
def resolve_weights(weights: str | None, dtype: str | None, block_size: int | None,
                    accuracy_level: int | None) -> tuple[str, str, int | None, int | None]:
    """(weights, dtype, block_size, accuracy_level) from the user's options, or a one-line FipsError."""
    if weights is None:
        weights = dtype or "fp32"
    if weights not in WEIGHTS:
        raise FipsError(f"weights must be one of {', '.join(WEIGHTS)} (got {weights!r}).")
    if dtype is not None and dtype not in DTYPES:
        raise FipsError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r}).")
    if weights in ("fp32", "fp16"):
        if dtype is not None and dtype != weights:
            raise FipsError(f"--dtype {dtype} contradicts --weights {weights}; give one of them.")
        if block_size is not None or accuracy_level is not None:
            raise FipsError(f"--block-size and --accuracy-level apply to --weights int8/int4, not {weights}.")
        return weights, weights, None, None
    if dtype not in (None, "fp32"):
        raise FipsError(f"--weights {weights} computes in fp32; --dtype {dtype} does not apply.")
    block_size = DEFAULT_BLOCK_SIZE[weights] if block_size is None else block_size
    accuracy_level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    if isinstance(block_size, bool) or block_size not in QUANT_BLOCK_SIZES:
        raise FipsError(f"block size must be one of {', '.join(map(str, QUANT_BLOCK_SIZES))} (got {block_size}).")
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise FipsError(f"accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                        f"(got {accuracy_level}).")
    return weights, "fp32", int(block_size), int(accuracy_level)


def export(model, output_path: str | os.PathLike, *, dtype: str | None = None, opset: int = 18,
           last_logits_only: bool = False, verify: bool = True, external_data: bool | None = None,
           checkpoint: str | None = None, log=None, weights: str | None = None, block_size: int | None = None,
           accuracy_level: int | None = None, sparse_group_size: int | None = None,
           basis_accuracy_level: int | None = None, basis_weights: str | None = None) -> ExportReport:
    """Export a dense or compressed model to ONNX; returns an :class:`ExportReport`.

    model: a ``LoadedModel``, an ``nn.Module`` of a supported family, a fips-rt ``model.pt`` (FiPS or
        DeltaLLM: the compressed network is written), or a model spec (``smollm2-135m``, an HF folder,
        a ``.gguf``, ``timm:NAME`` with ``checkpoint`` weights): the dense network.
    output_path: the ``.onnx`` file; external data (``<name>.onnx.data``), tokenizer files and
        ``fips_config.json`` are written beside it.
    dtype: "fp32" or "fp16" (fp16 weights and compute; norms and softmax in fp32).
    last_logits_only: causal LMs return logits for the last position only ([batch, 1, vocab]).
    verify: run the file in onnxruntime (CPU) against PyTorch and record per-output errors (quantized
        weights: a gross-error check with the tolerances of ``ExportConfig.QUANT_ATOL/QUANT_RTOL``).
    weights: "fp32" / "fp16" (same as ``dtype``) or "int8" / "int4" (exporter/quantize.py: MatMulNBits by
        onnxruntime's MatMulNBitsQuantizer with ``block_size`` and ``accuracy_level``, FiPS V through
        fips.QSparseMatMul with ``sparse_group_size`` (None: sparse_op.DEFAULT_GROUP_SIZE), the FiPS basis
        products x·U, t·Uᵀ as 8-bit MatMulNBits at ``basis_accuracy_level`` (None: ``accuracy_level``) after
        the exact rescaling of exporter/balance.py (``basis_weights="int8"``, the default for int8/int4), or
        left in fp32 (``"fp32"``).
    external_data: True/False to force; None = only when the weights exceed the 2 GB protobuf limit.
    """
    say = log or (lambda *_: None)
    t0 = time.time()
    weights, dtype, block_size, accuracy_level = resolve_weights(weights, dtype, block_size, accuracy_level)
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= max_opset:
        raise FipsError(f"opset must lie between {MIN_OPSET} and {max_opset} (got {opset}).")
    out = Path(output_path)
    _check_output(out, _input_paths(model, checkpoint))
    lm = _load(model, checkpoint)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FipsError(f"Cannot create the output folder {out.parent}: {e.strerror or e}.") from None
    from .configs import config_for
    cfg_cls = config_for(lm)
    if basis_weights is None:
        basis_weights = "int8"
    if basis_weights not in ("fp32", "int8"):
        raise FipsError(f"basis weights must be fp32 or int8 (got {basis_weights!r}).")
    config = cfg_cls(lm, dtype=dtype, opset=int(opset), last_logits_only=last_logits_only, weights=weights,
                     sparse_group_size=sparse_group_size, basis_weights=basis_weights,
                     sparse_activation_bits=8 if accuracy_level == 4 else 0)
    if last_logits_only and config.kind != "causal-lm":
        raise FipsError("--last-logits-only applies to causal language models only.")
    if config.quantized and not config.QUANTIZABLE:
        raise FipsError(f"--weights {weights} is available for causal LMs and encoders; {cfg_cls.family} models "
                        f"export with --weights fp32 or fp16.")
    method = _method(lm.model)
    say(f"building the {cfg_cls.family} graph ({method}, {weights}, opset {opset})")
    import torch
    from fips_rt.tempfiles import remove_stale_temporaries, temp_prefix
    remove_stale_temporaries(out)  # scratch folders of killed earlier runs
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=temp_prefix(out)) as scratch, torch.no_grad():
        proto, tags = config.build(Path(scratch))
    if config.build_facts.get("balanced"):
        say(f"rescaled {config.build_facts['balanced']} FiPS bases for the 8-bit basis products (exact; "
            "exporter/balance.py)")
    quant = None
    if config.quantized:
        from fips_rt.runtime.contract import QuantizationInfo

        from .quantize import quantize_model
        say(f"quantizing with onnxruntime's MatMulNBitsQuantizer ({weights}, block {block_size}, "
            f"accuracy level {accuracy_level})")
        facts = config.build_facts
        q = quantize_model(proto, tags, weights=weights, block_size=block_size, accuracy_level=accuracy_level,
                           basis_nodes=facts.get("basis_nodes", set()), tied_head=facts.get("tied_head", {}),
                           basis_accuracy_level=basis_accuracy_level, basis_weights=basis_weights)
        proto, tags = q.proto, q.tags
        for note in q.notes:
            say(f"note: {note}")
        qs = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == Q_OP_TYPE]
        quant = QuantizationInfo(
            weights=weights, block_size=block_size, accuracy_level=accuracy_level, embedding=q.embedding,
            matmul_nbits_nodes=q.matmul_nbits_nodes,
            basis_weights=(basis_weights if facts.get("bases") else None),
            sparse_bits=(onnx.helper.get_attribute_value(next(a for a in qs[0].attribute if a.name == "bits"))
                         if qs else None),
            sparse_group_size=(onnx.helper.get_attribute_value(next(a for a in qs[0].attribute
                                                                    if a.name == "group_size")) if qs else None),
            quantizer=q.quantizer)
    t_build = time.time()
    audit = audit_graph(proto)
    bytes_by_tag = _bytes_by_tag(proto, tags)
    init_bytes = sum(bytes_by_tag.values())
    will_external = external_data if external_data is not None else init_bytes > AUTO_EXTERNAL_BYTES
    side = _config_json(proto, config, lm, out, method, audit, will_external, quant)
    sidecars = _tokenizer_files(lm.tokenizer)
    from .ecosystem import loader_files  # config.json, generation_config.json, genai_config.json (Optimum, genai)
    sidecars.update(loader_files(lm.model, side, sidecars))
    sidecars[CONFIG_FILE] = (json.dumps(side, indent=2, default=str) + "\n").encode()
    previous = out.parent / CONFIG_FILE
    if previous.is_file():
        try:
            other = json.loads(previous.read_text()).get("model_file")
        except (OSError, ValueError):
            other = None
        if other and other != out.name:
            say(f"note: {previous} described {other}; it now describes {out.name} (one export per folder)")
    say(f"writing {out}")
    written = write_export(proto, out, external_data=will_external, sidecars=sidecars)
    del proto
    t_write = time.time()
    report = ExportReport(output=out, files=written.files, kind=config.kind, family=cfg_cls.family, method=method,
                          dtype=dtype, opset=int(opset), external_data=written.data is not None,
                          file_bytes=written.bytes_on_disk, initializer_bytes=init_bytes, bytes_by_tag=bytes_by_tag,
                          audit=audit, weights=weights, quantization=side.get("quantization", {}))
    if verify:
        say("checking parity with PyTorch in onnxruntime (CPU)")
        report.checks = _validate(out, config)
        if config.quantized:
            for c in report.checks:
                c.mean_rtol = config.QUANT_MEAN_RTOL[weights]
        report.verified = True
    report.seconds = {"build": round(t_build - t0, 2), "write": round(t_write - t_build, 2),
                      "verify": round(time.time() - t_write, 2)}
    return report
