"""``fips bench``: load time, memory, file size, prefill and decode latency of an exported model, optionally
side by side with a baseline (e.g. the dense export of the same model).

Every model is measured in a fresh Python process (``python -m fips_rt.runtime.bench --worker SPEC``)
with identical session options, threads, warm-up and repetitions. Memory:

- ``rss_before_mb``: the worker's RSS after its imports, right before the session is created;
- ``rss_after_load_mb`` / ``rss_after_run_mb``: RSS after creating the session / after all runs;
- ``peak_rss_mb``: the process's peak RSS (``VmHWM``, reset right before the session is created on Linux;
  elsewhere a psutil sampling thread, or ``getrusage``);
- ``model_*_mb``: the same minus ``rss_before_mb`` -- memory attributable to the model.

Raw samples are kept; statistics are mean, standard deviation, p50 and p95 in milliseconds. Nothing here
imports torch or transformers.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fips_rt.errors import FipsError
from fips_rt.procmem import ProcessMemory

SCHEMA = "fips-rt/bench/1"
MiB = 2 ** 20


# ============================================================================ statistics
@dataclass
class Stats:
    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Stats":
        xs = [float(x) for x in samples_ms]
        if not xs:
            raise ValueError("no samples")
        n = len(xs)
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
        return cls(n=n, mean_ms=mean, std_ms=std, p50_ms=percentile(xs, 50), p95_ms=percentile(xs, 95),
                   min_ms=min(xs), max_ms=max(xs), samples_ms=xs)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Stats | None":
        if d is None:
            return None
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), ``q`` in [0, 100]."""
    if not xs:
        raise ValueError("no samples")
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


# ============================================================================ result schema
@dataclass
class ModelBench:
    role: str                               # "compressed" or "baseline"
    path: str
    ok: bool = False
    error: str | None = None
    kind: str | None = None
    file_bytes: int | None = None
    file_mb: float | None = None
    kernel: str | None = None               # kernel path taken: native / reference
    kernel_isa: str | None = None           # native: the level it runs (portable / avx2 / avx512)
    kernel_build: str | None = None         # native: "prebuilt" (shipped) or "compiled" (here)
    provider: str | None = None
    threads: int | None = None
    spinning: bool | None = None
    prepacking: bool | None = None          # onnxruntime weight prepacking this side ran with
    prepacking_source: str | None = None    # "contract" (auto), "user" (--prepacking on/off) or "default"
    session_options: dict[str, Any] = field(default_factory=dict)  # the session options this side ran with
    weights: str | None = None              # the export's weight format (fips_config.json quantization.weights)
    load_s: float | None = None
    rss_before_mb: float | None = None
    rss_after_load_mb: float | None = None
    rss_after_run_mb: float | None = None
    peak_rss_mb: float | None = None        # whole process
    peak_method: str | None = None
    model_rss_after_load_mb: float | None = None
    model_rss_after_run_mb: float | None = None
    model_peak_rss_mb: float | None = None  # peak_rss_mb - rss_before_mb
    prefill: dict[str, Stats] = field(default_factory=dict)          # key: prompt length (tokens)
    prefill_tokens_per_s: dict[str, float] = field(default_factory=dict)
    skipped_prefill_lengths: list[int] = field(default_factory=list)
    decode: Stats | None = None             # per-token decode latency (wall clock)
    decode_cpu: Stats | None = None         # per-token process CPU time (all threads): robust to a busy machine
    decode_tokens_per_s: float | None = None
    decode_context: int | None = None
    rss_trace_mb: dict[str, float] = field(default_factory=dict)  # model RSS after each phase
    torch_imported: bool | None = None      # must stay False: the runtime is torch-free
    rounds: int = 1                         # fresh processes whose samples were pooled (scalars: median)
    loadavg: list[float] = field(default_factory=list)  # 1-min system load at the start of each process
    worker_wall_s: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelBench":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["prefill"] = {k: Stats.from_dict(v) for k, v in (d.get("prefill") or {}).items()}
        kw["decode"] = Stats.from_dict(d.get("decode"))
        kw["decode_cpu"] = Stats.from_dict(d.get("decode_cpu"))
        return cls(**kw)


@dataclass
class BenchResult:
    schema: str
    timestamp: str
    git_commit: str | None
    git_dirty: bool | None
    machine: dict[str, Any]
    settings: dict[str, Any]
    compressed: ModelBench
    baseline: ModelBench | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)  # compressed / baseline

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["compressed"] = ModelBench.from_dict(d["compressed"])
        kw["baseline"] = ModelBench.from_dict(d["baseline"]) if d.get("baseline") else None
        return cls(**kw)

    @property
    def ok(self) -> bool:
        return self.compressed.ok and (self.baseline is None or self.baseline.ok)


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def compute_ratios(c: ModelBench, b: ModelBench | None) -> dict[str, float | None]:
    if b is None or not (c.ok and b.ok):
        return {}
    r: dict[str, float | None] = {
        "decode_ms_p50": _ratio(c.decode and c.decode.p50_ms, b.decode and b.decode.p50_ms),
        "decode_ms_p95": _ratio(c.decode and c.decode.p95_ms, b.decode and b.decode.p95_ms),
        "decode_ms_mean": _ratio(c.decode and c.decode.mean_ms, b.decode and b.decode.mean_ms),
        "decode_tokens_per_s": _ratio(c.decode_tokens_per_s, b.decode_tokens_per_s),
        "decode_cpu_ms_p50": _ratio(c.decode_cpu and c.decode_cpu.p50_ms, b.decode_cpu and b.decode_cpu.p50_ms),
        "peak_rss_mb": _ratio(c.model_peak_rss_mb, b.model_peak_rss_mb),
        "rss_after_load_mb": _ratio(c.model_rss_after_load_mb, b.model_rss_after_load_mb),
        "rss_after_run_mb": _ratio(c.model_rss_after_run_mb, b.model_rss_after_run_mb),
        "process_peak_rss_mb": _ratio(c.peak_rss_mb, b.peak_rss_mb),
        "file_bytes": _ratio(c.file_bytes, b.file_bytes),
        "load_s": _ratio(c.load_s, b.load_s),
    }
    for k in c.prefill:
        if k in b.prefill:
            r[f"prefill_ms_p50.{k}"] = _ratio(c.prefill[k].p50_ms, b.prefill[k].p50_ms)
    return r


# ============================================================================ machine / provenance
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "machine": platform.machine(), "logical_cpus": os.cpu_count()}
    cpu_model, physical, flags = None, set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
        for block in blocks:
            kv = {}
            for line in block.splitlines():
                k, _, v = line.partition(":")
                kv[k.strip()] = v.strip()
            if cpu_model is None and kv.get("model name"):
                cpu_model = kv["model name"]
            if "core id" in kv:
                physical.add((kv.get("physical id"), kv["core id"]))
            if not flags and kv.get("flags"):
                flags = set(kv["flags"].split())
    except OSError:
        pass
    info["cpu_model"] = cpu_model or platform.processor() or None
    # the instruction sets the native kernel and onnxruntime's MLAS choose between
    info["cpu_flags"] = [fl for fl in ("avx2", "fma", "bmi2", "f16c", "avx512f") if fl in flags]
    info["physical_cores"] = len(physical) or None
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["usable_cpus"] = os.cpu_count()
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return info


def git_info(start: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding this package (or ``start``), read-only git calls."""
    where = str(start or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=30)
        return commit.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


# ============================================================================ worker (runs in a fresh process)
def run_worker(spec: dict) -> dict:
    """Measure one model as described by ``spec`` (in this process; call in a fresh one)."""
    import gc

    import numpy as np

    from .generate import Model  # all imports happen before the baseline RSS is taken
    try:
        from . import native  # noqa: F401  (imported here so that its import is not counted as model memory)
    except ImportError:
        pass

    res = ModelBench(role=spec["role"], path=spec["path"])
    try:
        res.loadavg = [round(os.getloadavg()[0], 2)]
    except (AttributeError, OSError):
        pass
    t_start = time.perf_counter()
    mem = ProcessMemory()
    try:
        gc.collect()
        res.rss_before_mb = mem.rss() / MiB
        mem.start_peak()
        t0 = time.perf_counter()
        model = Model.load(spec["path"], threads=spec.get("threads"), kernel=spec.get("kernel", "auto"),
                           provider=spec.get("provider", "cpu"), spinning=spec.get("spinning"),
                           prefill_chunk=spec.get("prefill_chunk", Model.DEFAULT_PREFILL_CHUNK),
                           prepacking=spec.get("prepacking", "auto"))
        res.load_s = time.perf_counter() - t0
        res.rss_after_load_mb = mem.rss() / MiB
        res.rss_trace_mb["load"] = res.rss_after_load_mb - res.rss_before_mb
        res.kind, res.kernel, res.provider = model.kind, model.info.kernel, model.info.provider
        res.threads, res.spinning = model.info.threads, model.info.spinning
        res.prepacking, res.prepacking_source = model.info.prepacking, model.info.prepacking_source
        res.session_options = {"intra_op_num_threads": model.info.threads, "inter_op_num_threads": 1,
                               "enable_mem_pattern": model.info.mem_pattern, "prepacking": model.info.prepacking,
                               "prepacking_source": model.info.prepacking_source,
                               "config_entries": dict(model.info.config_entries)}
        if model.contract is not None:
            res.weights = model.contract.quantization.weights
        if res.kernel == "native":  # the library's level and origin (native.kernel_info, after registering)
            from . import native
            ki = native.kernel_info()
            res.kernel_isa, res.kernel_build = ki["isa"], ki["build"]
        rng = np.random.default_rng(spec.get("seed", 0))
        warmup, reps = int(spec["warmup"]), int(spec["repetitions"])

        def timed(fn, n_warm, n_rep) -> list[float]:
            for _ in range(n_warm):
                fn()
            out = []
            for _ in range(n_rep):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1000.0)
            return out

        if model.kind == "causal-lm":
            vocab = model.vocab_size or 1000
            ctx = model.max_positions
            low = min(10, vocab - 1)  # avoid the first (often special) ids

            def rand_ids(n):
                return rng.integers(low, vocab, size=n).tolist()
            for L in spec["prompt_lengths"]:
                if ctx and L > ctx:
                    res.skipped_prefill_lengths.append(L)
                    continue
                ids = rand_ids(L)
                st = Stats.of(timed(lambda: model.prefill(ids), warmup, reps))
                res.prefill[str(L)] = st
                res.prefill_tokens_per_s[str(L)] = L / (st.mean_ms / 1000.0)
                res.rss_trace_mb[f"prefill {L}"] = mem.rss() / MiB - res.rss_before_mb
            n_dec = int(spec["decode_tokens"])
            if n_dec > 0:
                dctx = int(spec["decode_context"])
                if ctx:
                    dctx = max(1, min(dctx, ctx - n_dec))
                res.decode_context = dctx
                samples: list[float] = []
                cpu_samples: list[float] = []

                def decode_run(keep: bool):
                    ids = rand_ids(dctx)
                    logits, cache = model.prefill(ids)
                    for _ in range(n_dec):
                        tok = int(np.argmax(logits))
                        c = time.process_time()
                        t = time.perf_counter()
                        logits, cache = model.forward([tok], cache)
                        if keep:
                            samples.append((time.perf_counter() - t) * 1000.0)
                            cpu_samples.append((time.process_time() - c) * 1000.0)
                for _ in range(warmup):
                    decode_run(False)
                for _ in range(reps):
                    decode_run(True)
                res.decode = Stats.of(samples)
                res.decode_cpu = Stats.of(cpu_samples)
                res.decode_tokens_per_s = 1000.0 / res.decode.mean_ms
                res.rss_trace_mb["decode"] = mem.rss() / MiB - res.rss_before_mb
        elif model.kind == "encoder":
            seq_limit = model.max_positions or 512
            vocab = model.tokenizer.vocab_size
            for L in spec["prompt_lengths"]:
                if L > seq_limit:
                    res.skipped_prefill_lengths.append(L)
                    continue
                ids = rng.integers(min(1000, vocab - 1), vocab, size=L).tolist()
                st = Stats.of(timed(lambda: model._embed_ids([ids]), warmup, reps))
                res.prefill[str(L)] = st
                res.prefill_tokens_per_s[str(L)] = L / (st.mean_ms / 1000.0)
        else:  # image classifier: "prefill" = one image forward (key "image")
            shape = tuple(d or 224 for d in model.image_shape)
            x = rng.standard_normal((1, *shape)).astype(np.float32)
            st = Stats.of(timed(lambda: model.classify_logits(x), warmup, reps))
            res.prefill["image"] = st
            res.prefill_tokens_per_s["image"] = 1000.0 / st.mean_ms
        res.rss_after_run_mb = mem.rss() / MiB
        res.peak_rss_mb = mem.peak() / MiB
        res.peak_method = mem.method
        res.model_rss_after_load_mb = res.rss_after_load_mb - res.rss_before_mb
        res.model_rss_after_run_mb = res.rss_after_run_mb - res.rss_before_mb
        res.model_peak_rss_mb = res.peak_rss_mb - res.rss_before_mb
        res.torch_imported = "torch" in sys.modules
        res.ok = True
    except FipsError as e:  # the user's mistake (a bad file, a bad option): one line, reported by the parent
        res.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        res.ok = False
    except Exception as e:  # a bug: keep the traceback for the report
        import traceback
        res.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        res.ok = False
    res.worker_wall_s = time.perf_counter() - t_start
    return asdict(res)


# ============================================================================ parent
def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    # the package must be importable in the child exactly as here
    pkg_root = str(Path(__file__).resolve().parent.parent)
    if (Path(pkg_root) / "fips_rt").is_dir():
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_model_in_subprocess(spec: dict, timeout: float | None = None) -> ModelBench:
    """Run :func:`run_worker` in a fresh interpreter and parse its result."""
    from .session import model_file_bytes, resolve_model_path
    res_path = None
    try:
        onnx_path, _ = resolve_model_path(spec["path"])
        file_bytes = model_file_bytes(onnx_path)
    except Exception as e:
        return ModelBench(role=spec["role"], path=str(spec["path"]), ok=False, error=f"{type(e).__name__}: {e}")
    try:
        fd, res_path = tempfile.mkstemp(prefix="fips-bench-", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, "-m", "fips_rt.runtime.bench", "--worker", json.dumps(spec), "--out", res_path]
        proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=timeout)
        data = None
        try:
            with open(res_path) as f:
                text = f.read()
            data = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            data = None
        if data is None:
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return ModelBench(role=spec["role"], path=str(spec["path"]), ok=False, file_bytes=file_bytes,
                              error=f"worker exited with status {proc.returncode} and no result:\n{tail}")
        mb = ModelBench.from_dict(data)
        if proc.returncode != 0 and mb.ok:
            mb.ok, mb.error = False, f"worker exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        return ModelBench(role=spec["role"], path=str(spec["path"]), ok=False, file_bytes=file_bytes,
                          error=f"worker timed out after {timeout} s")
    finally:
        if res_path:
            try:
                os.unlink(res_path)
            except OSError:
                pass
    mb.path = str(spec["path"])
    mb.file_bytes = file_bytes
    mb.file_mb = file_bytes / 2**20
    return mb


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def merge_rounds(runs: list[ModelBench]) -> ModelBench:
    """Pool the samples of several fresh-process runs of one model (scalars: the median over runs)."""
    if len(runs) == 1:
        return runs[0]
    failed = [r for r in runs if not r.ok]
    if failed:
        return failed[0]
    m = ModelBench.from_dict(asdict(runs[0]))
    for name in ("load_s", "rss_before_mb", "rss_after_load_mb", "rss_after_run_mb", "peak_rss_mb",
                 "model_rss_after_load_mb", "model_rss_after_run_mb", "model_peak_rss_mb", "worker_wall_s"):
        setattr(m, name, _median([getattr(r, name) for r in runs]))
    for k in m.prefill:
        m.prefill[k] = Stats.of([x for r in runs for x in r.prefill[k].samples_ms])
        length = 1.0 if k == "image" else float(k)
        m.prefill_tokens_per_s[k] = length / (m.prefill[k].mean_ms / 1000.0)
    if m.decode is not None:
        m.decode = Stats.of([x for r in runs for x in r.decode.samples_ms])
        m.decode_tokens_per_s = 1000.0 / m.decode.mean_ms
    if m.decode_cpu is not None:
        m.decode_cpu = Stats.of([x for r in runs for x in r.decode_cpu.samples_ms])
    m.rss_trace_mb = {k: _median([r.rss_trace_mb.get(k) for r in runs]) for k in m.rss_trace_mb}
    m.torch_imported = any(r.torch_imported for r in runs)
    m.rounds = len(runs)
    m.loadavg = [x for r in runs for x in r.loadavg]
    return m


def run_bench(model: str, baseline: str | None = None, *, prompt_lengths=(1, 64, 512), decode_tokens: int = 32,
              decode_context: int = 64, repetitions: int = 5, warmup: int = 1, threads: int | None = None,
              kernel: str = "auto", spinning: str = "on", prefill_chunk: int | None = 512, seed: int = 0,
              rounds: int = 1, timeout: float | None = 3600, log=None, prepacking: str = "auto") -> BenchResult:
    """Benchmark ``model`` (and ``baseline``), each in a fresh process with identical settings.

    ``rounds`` > 1 alternates the two models (compressed, baseline, compressed, ...), each time in a fresh
    process, and pools the samples, so that a change of background load hits both alike.
    ``prepacking`` ("auto" | "on" | "off"): auto gives each model the prepacking its export contract asks
    for (so each side runs with its own best options); each side's options are in its ``session_options``.
    """
    if prepacking not in ("auto", "on", "off"):
        raise ValueError("prepacking must be auto, on or off")
    from .session import default_threads
    if repetitions < 1:
        raise ValueError("repetitions must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    threads = int(threads) if threads else default_threads()
    spin = {"off": False, "on": True, "auto": None}[spinning]
    settings = {"prompt_lengths": [int(x) for x in prompt_lengths], "decode_tokens": int(decode_tokens),
                "decode_context": int(decode_context), "repetitions": int(repetitions), "warmup": int(warmup),
                "threads": threads, "kernel": kernel, "spinning": spinning, "seed": int(seed), "provider": "cpu",
                "prefill_chunk": prefill_chunk, "rounds": int(rounds), "prepacking": prepacking,
                "session_options": {"prepacking": {"auto": "per model: its fips_config.json (see each model's "
                                                           "session_options)",
                                                   "on": "on", "off": "off (session.disable_prepacking=1)"}[prepacking],
                                    "intra_op_num_threads": threads,
                                    "inter_op_num_threads": 1, "enable_mem_pattern": False,
                                    "session.intra_op.allow_spinning": {"off": "0", "on": "1",
                                                                        "auto": "1 (onnxruntime default)"}[spinning],
                                    "graph_optimization_level": "ORT_ENABLE_ALL"},
                "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
    commit, dirty = git_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    runs: dict[str, list[ModelBench]] = {}
    for rnd in range(rounds):
        for role, path in (("compressed", model), ("baseline", baseline)):
            if path is None:
                continue
            spec = {"role": role, "path": str(path), "threads": threads, "kernel": kernel, "spinning": spin,
                    "provider": "cpu", "prompt_lengths": settings["prompt_lengths"], "decode_tokens": decode_tokens,
                    "decode_context": decode_context, "repetitions": repetitions, "warmup": warmup, "seed": seed,
                    "prefill_chunk": prefill_chunk, "prepacking": prepacking}
            if log:
                log(f"benchmarking {role}" + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else "") + f": {path}")
            r = run_model_in_subprocess(spec, timeout=timeout)
            runs.setdefault(role, []).append(r)
            if log:
                log(f"  {role}: " + ("ok" if r.ok else f"FAILED: {r.error}"))
    results = {role: merge_rounds(rs) for role, rs in runs.items()}
    c, b = results["compressed"], results.get("baseline")
    return BenchResult(schema=SCHEMA, timestamp=stamp, git_commit=commit, git_dirty=dirty, machine=machine_info(),
                       settings=settings, compressed=c, baseline=b, ratios=compute_ratios(c, b))


# ============================================================================ reports
def display_name(path: str) -> str:
    """``runs/x/fips/model.onnx`` -> ``fips/model.onnx`` (the folder names exported models)."""
    p = Path(path)
    if p.suffix != ".onnx":
        return p.name
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ms(st: Stats | None) -> str:
    return "–" if st is None else f"{st.mean_ms:.2f} ± {st.std_ms:.2f}"


def to_markdown(r: BenchResult) -> str:
    c, b = r.compressed, r.baseline
    cols = ["compressed"] + (["baseline", "ratio"] if b else [])
    lines = [f"### fips bench — {display_name(c.path)}" + (f" vs {display_name(b.path)}" if b else ""), ""]
    m = r.machine
    s = r.settings
    lines.append(f"{m.get('cpu_model')} ({m.get('usable_cpus')} usable CPUs), onnxruntime {m.get('onnxruntime')}, "
                 f"{s.get('rounds', 1)} round(s) of fresh processes, "
                 f"threads {s['threads']}, kernel {s['kernel']}, spinning {s['spinning']}, "
                 f"prefill chunk {s.get('prefill_chunk')}, "
                 f"{s['warmup']} warm-up + {s['repetitions']} repetitions; commit "
                 f"{(r.git_commit or 'unknown')[:12]}{' (dirty)' if r.git_dirty else ''}, {r.timestamp}")
    lines.append("")
    lines.append("| metric | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))

    def row(name, fc, fb=None, ratio_key=None, fmt="{:.2f}"):
        vals = [fc]
        if b:
            vals += [fb, _f(r.ratios.get(ratio_key), "{:.3f}x") if ratio_key else ""]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")

    def kernel(mb):
        return (mb.kernel or "–") + (f" ({mb.kernel_isa}, {mb.kernel_build})" if mb.kernel_isa else "")

    def options(mb):
        if mb.prepacking is None:
            return "–"
        return (f"prepacking {'on' if mb.prepacking else 'off'} ({mb.prepacking_source}), "
                f"{mb.threads} threads, spinning {'on' if mb.spinning else 'off'}")

    row("kernel path", kernel(c), kernel(b) if b else None)
    row("weights", c.weights or "–", (b.weights or "–") if b else None)
    row("session options", options(c), options(b) if b else None)
    row("file size (MiB)", _f(c.file_mb), _f(b.file_mb) if b else None, "file_bytes")
    row("load time (s)", _f(c.load_s, "{:.3f}"), _f(b.load_s, "{:.3f}") if b else None, "load_s")
    row("model RSS after load (MiB)", _f(c.model_rss_after_load_mb, "{:.1f}"),
        _f(b.model_rss_after_load_mb, "{:.1f}") if b else None, "rss_after_load_mb")
    row("model RSS after run (MiB)", _f(c.model_rss_after_run_mb, "{:.1f}"),
        _f(b.model_rss_after_run_mb, "{:.1f}") if b else None, "rss_after_run_mb")
    row("model peak RSS (MiB)", _f(c.model_peak_rss_mb, "{:.1f}"), _f(b.model_peak_rss_mb, "{:.1f}") if b else None,
        "peak_rss_mb")
    row("process peak RSS (MiB)", _f(c.peak_rss_mb, "{:.1f}"), _f(b.peak_rss_mb, "{:.1f}") if b else None,
        "process_peak_rss_mb")
    for k in c.prefill:
        label = f"prefill {k} tokens (ms)" if k != "image" else "forward, 1 image (ms)"
        row(label, _ms(c.prefill.get(k)), _ms(b.prefill.get(k)) if b else None, f"prefill_ms_p50.{k}")
    if c.decode or (b and b.decode):
        row(f"decode ms/token p50 (context {c.decode_context})", _f(c.decode and c.decode.p50_ms, "{:.3f}"),
            _f(b.decode and b.decode.p50_ms, "{:.3f}") if b else None, "decode_ms_p50")
        row("decode ms/token p95", _f(c.decode and c.decode.p95_ms, "{:.3f}"),
            _f(b.decode and b.decode.p95_ms, "{:.3f}") if b else None, "decode_ms_p95")
        row("decode ms/token mean ± sd", _ms(c.decode), _ms(b.decode) if b else None, "decode_ms_mean")
        row("decode tokens/s", _f(c.decode_tokens_per_s, "{:.1f}"), _f(b.decode_tokens_per_s, "{:.1f}") if b else None,
            "decode_tokens_per_s")
        row("decode CPU ms/token p50 (all threads)", _f(c.decode_cpu and c.decode_cpu.p50_ms, "{:.3f}"),
            _f(b.decode_cpu and b.decode_cpu.p50_ms, "{:.3f}") if b else None, "decode_cpu_ms_p50")
    lines.append("")
    if b:
        lines.append("Ratios are compressed / baseline; RSS rows are the process RSS minus its RSS right before the "
                     "session was created (memory attributable to the model); prefill ratios compare p50s.")
    for mb in (c, b):
        if mb is not None and not mb.ok:
            lines.append(f"\n**{mb.role} failed:** `{(mb.error or '').splitlines()[0] if mb.error else ''}`")
    return "\n".join(lines) + "\n"


def plot(r: BenchResult, path: str | os.PathLike) -> None:
    """Write a PNG summary (needs matplotlib, imported here only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    models = [m for m in (r.compressed, r.baseline) if m is not None and m.ok]
    colors = {"compressed": "#1f77b4", "baseline": "#7f7f7f"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    # prefill
    ax = axes[0]
    keys = list(r.compressed.prefill)
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(keys))]
        means = [m.prefill[k].mean_ms if k in m.prefill else 0 for k in keys]
        sds = [m.prefill[k].std_ms if k in m.prefill else 0 for k in keys]
        ax.bar(xs, means, width, yerr=sds, label=f"{m.role} ({display_name(m.path)})", color=colors[m.role], capsize=3)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill latency (ms, mean ± sd)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("prefill")
    # decode
    ax = axes[1]
    labels = ["p50", "p95", "mean"]
    for i, m in enumerate(models):
        if m.decode is None:
            continue
        vals = [m.decode.p50_ms, m.decode.p95_ms, m.decode.mean_ms]
        ax.bar([j + i * width for j in range(3)], vals, width, color=colors[m.role], label=m.role,
               yerr=[0, 0, m.decode.std_ms], capsize=3)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(3)])
    ax.set_xticklabels(labels)
    ax.set_ylabel("decode latency (ms / token)")
    ax.set_title(f"decode (context {r.compressed.decode_context})")
    ax.legend(fontsize=8)
    # memory and size
    ax = axes[2]
    labels = ["RSS after run", "peak RSS", "file size"]
    for i, m in enumerate(models):
        vals = [m.model_rss_after_run_mb or 0, m.model_peak_rss_mb or 0, m.file_mb or 0]
        ax.bar([j + i * width for j in range(3)], vals, width, color=colors[m.role], label=m.role)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(3)])
    ax.set_xticklabels(labels)
    ax.set_ylabel("MiB (RSS: attributable to the model)")
    ax.set_title("memory and size")
    ax.legend(fontsize=8)
    title = f"fips bench — {r.machine.get('cpu_model')}, {r.settings['threads']} threads, onnxruntime " \
            f"{r.machine.get('onnxruntime')}"
    if r.ratios.get("decode_ms_p50") is not None:
        title += f"\ndecode p50 ratio {r.ratios['decode_ms_p50']:.3f}x, model peak RSS ratio " \
                 f"{r.ratios['peak_rss_mb']:.3f}x (compressed / baseline)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def write_reports(r: BenchResult, *, json_path=None, markdown_path=None, plot_path=None) -> None:
    for p in (json_path, markdown_path, plot_path):
        if p:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        Path(json_path).write_text(r.to_json() + "\n")
    if markdown_path:
        Path(markdown_path).write_text(to_markdown(r))
    if plot_path:
        plot(r, plot_path)


# ============================================================================ worker entry point
def _worker_main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fips_rt.runtime.bench")
    ap.add_argument("--worker", required=True, help="JSON spec")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    spec = json.loads(a.worker)
    res = run_worker(spec)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
