"""Open an exported model (a folder or an ``.onnx`` file) in onnxruntime with the options that matter.

Torch-free: this module imports only the standard library, numpy and onnxruntime.

Session options applied (see docs/runtime.md and the measurements in the ORT notes):

- ``session.disable_prepacking = 1`` unless the file asks for prepacking: prepacking keeps a second,
  repacked copy of every float MatMul weight (it roughly doubles weight RAM for a dense fp32 model), but
  onnxruntime's quantized ``MatMulNBits`` kernels need their blocks repacked at load. ``prepacking``
  "auto" (the default) takes what the export contract says (``session.prepacking`` of
  ``fips_config.json``: on for ``--weights int8|int4`` files, off otherwise; off without a contract);
  "on" / "off" (or True / False) override it;
- ``intra_op_num_threads``: ``threads`` or the number of CPU cores;
- intra-op thread spinning on (onnxruntime's default) unless ``spinning=False``: the native
  ``fips.SparseMatMul`` kernel runs on onnxruntime's own pool, and a decode step is hundreds of short
  parallel sections, each of which would otherwise wait for sleeping threads to wake (measured on
  SmolLM2, 2 threads: decode 30.5 -> 24.8 ms/token dense, 31.3 -> 22.9 FiPS). ``spinning=False``
  saves the CPU time the pool burns between nodes (servers with idle periods, battery devices);
- ``OMP_WAIT_POLICY=PASSIVE`` in the environment unless already set (it only takes effect when set
  before onnxruntime/OpenMP start, so :func:`configure_environment` is called on import);
- the CUDA execution provider when onnxruntime-gpu sees a GPU, the CPU provider otherwise. The native
  CPU kernel is never registered in a CUDA session (it would force device copies around every layer):
  the model's FunctionProto bodies (standard ops) run on the GPU instead.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def configure_environment() -> None:
    """Set process-wide defaults that must exist before onnxruntime creates its threads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


configure_environment()

import onnxruntime as ort  # noqa: E402  (after the environment is configured)

from fips_rt.errors import FipsError  # noqa: E402  (torch-free)

KERNELS = ("auto", "native", "reference")
PREPACKING = ("auto", "on", "off")
PROVIDERS = ("auto", "cpu", "cuda")
MODEL_FILE_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx")


class FipsRuntimeError(FipsError, RuntimeError):
    """An error of fips_rt.runtime whose message is meant for the user (the CLI prints it as one line)."""


# ---------------------------------------------------------------------------- model files
def resolve_model_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """Return ``(onnx_file, model_dir)`` for a model folder or an ``.onnx`` file."""
    p = Path(path)
    if not p.exists():
        raise FipsRuntimeError(f"Model not found: {str(path)!r} does not exist.")
    if p.is_file():
        if p.suffix != ".onnx":
            raise FipsRuntimeError(f"{p} is not an .onnx file.")
        return p, p.parent
    for name in MODEL_FILE_NAMES:
        if (p / name).is_file():
            return p / name, p
    candidates = sorted(p.glob("*.onnx"))
    if len(candidates) == 1:
        return candidates[0], p
    if not candidates:
        raise FipsRuntimeError(f"No .onnx file in {p}.")
    raise FipsRuntimeError(f"Several .onnx files in {p} ({', '.join(c.name for c in candidates)}); "
                           f"pass the file itself.")


def external_data_files(onnx_path: str | os.PathLike) -> list[Path]:
    """Files holding the model's external initializers (empty if the weights are inline).

    Uses ``onnx`` (if installed) to read the references without loading any weights; falls back to
    the usual naming conventions (``model.onnx.data``, ``model.onnx_data``, ``model.data``).
    """
    onnx_path = Path(onnx_path)
    found: set[Path] = set()
    try:
        import onnx  # optional; imports no torch
        m = onnx.load(str(onnx_path), load_external_data=False)
        tensors = list(m.graph.initializer)
        for node in m.graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append(a.t)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for kv in t.external_data:
                    if kv.key == "location":
                        f = (onnx_path.parent / kv.value)
                        if f.is_file():
                            found.add(f.resolve())
        return sorted(found)
    except ImportError:
        pass
    except Exception:  # a file onnx cannot parse: fall back to names
        pass
    for suffix in (".onnx.data", ".onnx_data", ".data"):
        stem = onnx_path.name[: -len(".onnx")] if onnx_path.name.endswith(".onnx") else onnx_path.name
        f = onnx_path.parent / (stem + suffix)
        if f.is_file():
            found.add(f.resolve())
    return sorted(found)


def model_file_bytes(onnx_path: str | os.PathLike) -> int:
    """Size on disk of the .onnx file plus its external data files."""
    onnx_path = Path(onnx_path)
    return onnx_path.stat().st_size + sum(f.stat().st_size for f in external_data_files(onnx_path))


def read_json(path: Path) -> dict:
    """Read a JSON object defensively: a missing or unreadable file gives ``{}``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def check_model(onnx_path: str | os.PathLike) -> int:
    """Check every ``fips.SparseMatMul`` node of the file against the op's rule (docs/sparse-op.md).

    Returns the number of nodes checked; a node that breaks the rule (or a file that is not an ONNX
    model) raises :class:`FipsRuntimeError`, one line naming the node and what is wrong. Torch- and
    onnx-free (fips_rt.runtime.validate).
    """
    from .validate import ModelValidationError, validate_model
    try:
        return validate_model(onnx_path)
    except ModelValidationError as e:
        raise FipsRuntimeError(f"{onnx_path}: invalid model: {e}") from None


# ---------------------------------------------------------------------------- devices
def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA EP and a CUDA device answers."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import ctypes
        for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            return False
        if lib.cuInit(0) != 0:
            return False
        n = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
    except Exception:
        return False


def default_threads() -> int:
    """Number of CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- session
@dataclass
class SessionInfo:
    """What :func:`create_session` did: the options actually used, for logs and benchmarks."""
    onnx_path: str
    model_dir: str
    provider: str                 # "cpu" or "cuda"
    providers: list[str]          # what the session reports
    kernel: str                   # kernel path taken: "native", "reference" (function bodies) or "none"
    kernel_requested: str
    threads: int
    spinning: bool
    prepacking: bool
    mem_pattern: bool
    load_s: float
    config_entries: dict[str, str] = field(default_factory=dict)
    prepacking_source: str = "default"  # "contract" (auto: the file's fips_config.json), "user" or "default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_kernel(so: "ort.SessionOptions", kernel: str) -> str:
    """Register the fips.SparseMatMul CPU kernel via ``fips_rt.runtime.native.register``.

    Returns the path taken ("native" or "reference"). ``auto`` falls back to the reference path (the
    model's function bodies) when the native library is unavailable; ``native`` raises instead.
    """
    if kernel not in KERNELS:
        raise FipsRuntimeError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "reference":
        return "reference"
    try:
        from . import native
    except ImportError as e:
        if kernel == "native":
            raise FipsRuntimeError(f"kernel='native' requested but fips_rt.runtime.native is unavailable: {e}")
        return "reference"
    try:
        taken = native.register(so, kernel=kernel)
    except FipsRuntimeError:  # e.g. FIPS_SPARSE_ISA names a level this CPU lacks: never a silent fallback
        raise
    except Exception as e:
        if kernel == "native":
            raise FipsRuntimeError(f"could not register the native fips.SparseMatMul kernel: {e}") from e
        return "reference"
    return str(taken) if taken else "reference"


def session_options(*, threads: int | None = None, kernel: str = "auto", provider: str = "cpu",
                    spinning: bool | None = None, prepacking: bool = False, mem_pattern: bool = False,
                    optimization: str = "all") -> tuple["ort.SessionOptions", dict]:
    """Build SessionOptions; returns ``(options, facts)`` with the kernel path and the settings used.

    ``mem_pattern`` is off by default: onnxruntime plans and caches one arena block per distinct set of
    input shapes, and in decoding every step has a new past length -- it only costs memory there (one
    extra activation-sized block after a repeated long prefill: ~47 MiB for SmolLM2 at 512 tokens).
    """
    so = ort.SessionOptions()
    so.enable_mem_pattern = bool(mem_pattern)
    threads = int(threads) if threads else default_threads()
    if threads < 1:
        raise FipsRuntimeError(f"threads must be >= 1, got {threads}")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    entries: dict[str, str] = {}
    if not prepacking:
        entries["session.disable_prepacking"] = "1"
    if provider == "cuda":
        if kernel == "native":
            raise FipsRuntimeError("kernel='native' is a CPU kernel and is never registered in a CUDA session; "
                                   "use kernel='auto' or 'reference', or provider='cpu'.")
        taken = "reference"
    else:
        taken = register_kernel(so, kernel)
    if spinning is None:
        spinning = True
    if not spinning:
        entries["session.intra_op.allow_spinning"] = "0"
        entries["session.inter_op.allow_spinning"] = "0"
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    return so, {"kernel": taken, "threads": threads, "spinning": bool(spinning),
                "prepacking": bool(prepacking), "mem_pattern": bool(mem_pattern), "config_entries": entries}


def resolve_prepacking(prepacking: "bool | str | None", model_dir: str | os.PathLike,
                       onnx_name: str | None = None) -> tuple[bool, str]:
    """``(prepacking, source)`` for ``prepacking`` in None / "auto" / "on" / "off" / True / False.

    auto (None): the export contract's ``session.prepacking`` (source "contract"); without a
    ``fips_config.json``: off (source "default"). A contract that cannot be read is a FipsRuntimeError."""
    if isinstance(prepacking, bool):
        return prepacking, "user"
    if prepacking is None:
        prepacking = "auto"
    if prepacking not in PREPACKING:
        raise FipsRuntimeError(f"prepacking must be one of {', '.join(PREPACKING)}, got {prepacking!r}")
    if prepacking != "auto":
        return prepacking == "on", "user"
    from .contract import ContractError, read_contract
    try:
        contract = read_contract(model_dir)
    except ContractError as e:
        raise FipsRuntimeError(str(e)) from None
    if contract is None or (onnx_name is not None and contract.model_file != onnx_name):
        return False, "default"  # no contract, or one that describes another file of the folder
    return bool(contract.session.prepacking), "contract"


def create_session(path: str | os.PathLike, *, threads: int | None = None, kernel: str = "auto",
                   provider: str = "auto", spinning: bool | None = None, prepacking: "bool | str | None" = "auto",
                   mem_pattern: bool = False,
                   optimization: str = "all") -> tuple["ort.InferenceSession", SessionInfo]:
    """Open ``path`` (model folder or .onnx) in onnxruntime; returns ``(session, info)``.

    ``kernel``: "auto" (native fips.SparseMatMul kernel when it can be built/loaded, else the function
    bodies), "native" (fail if unavailable) or "reference" (function bodies only).
    ``provider``: "auto" (CUDA when onnxruntime-gpu sees a GPU, else CPU), "cpu" or "cuda".
    ``spinning``: intra-op thread spinning; None = on (onnxruntime's default), False = threads sleep between nodes.
    ``prepacking``: "auto" (the export contract's choice, see the module docstring), "on"/"off" or a bool.
    """
    onnx_path, model_dir = resolve_model_path(path)
    prepacking, prepacking_source = resolve_prepacking(prepacking, model_dir, onnx_path.name)
    if provider not in PROVIDERS:
        raise FipsRuntimeError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "auto":
        provider = "cuda" if cuda_available() else "cpu"
    elif provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise FipsRuntimeError("provider='cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                               "(pip uninstall onnxruntime && pip install onnxruntime-gpu).")
    t0 = time.perf_counter()
    check_model(onnx_path)  # before onnxruntime parses anything, whichever kernel path is taken
    so, facts = session_options(threads=threads, kernel=kernel, provider=provider, spinning=spinning,
                                prepacking=prepacking, mem_pattern=mem_pattern, optimization=optimization)
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                 else ["CPUExecutionProvider"])
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    except Exception as e:
        raise FipsRuntimeError(f"onnxruntime could not load {onnx_path}: {e}") from e
    load_s = time.perf_counter() - t0
    kernel_taken = facts["kernel"]
    info = SessionInfo(onnx_path=str(onnx_path), model_dir=str(model_dir), provider=provider,
                       providers=list(sess.get_providers()), kernel=kernel_taken, kernel_requested=kernel,
                       threads=facts["threads"], spinning=facts["spinning"], prepacking=facts["prepacking"],
                       mem_pattern=facts["mem_pattern"],
                       load_s=load_s,
                       config_entries=facts["config_entries"], prepacking_source=prepacking_source)
    return sess, info


def onnxruntime_version() -> str:
    return ort.__version__
