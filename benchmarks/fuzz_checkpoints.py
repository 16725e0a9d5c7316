"""Fuzz the checkpoint loader: seeded mutations of real (tiny) checkpoints plus crafted attack files.

Every case is a ``model.pt`` re-sealed with a recomputed checksum (so it gets past the integrity
check, as an attacker's file would) and loaded by ``fips_rt.checkpoint.load_checkpoint``. Outcomes:

    accepted   loaded, and its forward pass ran on the fixture's input
    refused    CheckpointError with a one-line message
    multiline  CheckpointError whose message spans lines (counted as a failure)
    traceback  any other exception (a failure)
    delayed    loaded but its forward pass failed afterwards (a failure)
    crash      the worker process died (segfault, abort, OOM kill) (a failure)
    hang       no answer within --timeout seconds (a failure)

Mutations change header fields (types, numbers, strings, lists, dict keys), tensor shapes and
dtypes, tensor dict keys and tokenizer files, one to three per case, from the four fixtures in
tests/fixtures (FiPS llama with a tokenizer, DeltaLLM llama, dense qwen2, FiPS deit). Cases run in
one worker subprocess (restarted after a crash or a hang), so neither stops the run.

    nice -n 10 python benchmarks/fuzz_checkpoints.py --cases 1000     # writes benchmarks/results/fuzz_checkpoints.{json,md}
    python benchmarks/fuzz_checkpoints.py --cases 50 --no-write

tests/test_hardening_checkpoint.py imports this module for its in-process mutation test.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FIXTURE_NAMES = ("tiny_llama_fips", "tiny_llama_deltallm", "tiny_qwen2_dense", "tiny_deit_fips")
FAILURES = ("multiline", "traceback", "delayed", "crash", "hang")
MARKER_ENV = "FIPS_FUZZ_MARKER"


# ------------------------------------------------------------------------------- files
def load_raw(path: Path) -> dict:
    import torch
    return torch.load(str(path), map_location="cpu", weights_only=True)


def write_sealed(obj, path: Path) -> Path:
    """torch.save + the integrity seal with a recomputed checksum (what an attacker can always do)."""
    import torch

    from fips_rt.checkpoint import _seal
    path = Path(path)
    torch.save(obj, path)
    _seal(path)
    return path


def fixture_input(name: str):
    import numpy as np
    import torch
    return torch.from_numpy(np.load(FIXTURES / f"{name}.npz")["input"])


# ------------------------------------------------------------------------------- mutations
def _walk(value, prefix=()):
    """Every (path, value) inside nested dicts / lists."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, prefix + (i,))


def _get(root, path):
    for p in path:
        root = root[p]
    return root


def _set(root, path, value):
    _get(root, path[:-1])[path[-1]] = value


def _weird_value(rng: random.Random, torch):
    return rng.choice([
        None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 40, -2 ** 63, 10 ** 12, 1.5, float("nan"), float("inf"),
        "", "x", "__class__", "model.layers.0.mlp.__class__.forward", "../../etc/passwd", "a" * 5000,
        "LlamaForCausalLM", "in", "out", "basis.0", "shared.0", [], [1, 2], [[1]], {}, {"a": 1}, b"\x00\xff",
        (1, 2), torch.zeros(2), torch.float32, "\nnew line",
    ])


def _number_variant(rng: random.Random, v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, 0, -v, v * 2, v * 1000, 2 ** 31, 2 ** 31 - 1, 10 ** 12, -1,
                           v // 2 if v else 7])
    return rng.choice([v * 2, -v, 0.0, float("nan"), float("inf"), 1e308])


def _string_variant(rng: random.Random, v: str):
    choices = [v + "x", v[:-1], "", v.upper(), v.replace(".", "..") if "." in v else v + ".",
               v + ".__class__", "__" + v, v.replace("0", "1") if "0" in v else v + "0", "/" + v, v + "\n"]
    return rng.choice(choices)


def mutate_header(obj: dict, rng: random.Random, torch) -> str:
    header = obj["header"]
    paths = [p for p, _ in _walk(header) if p]
    path = rng.choice(paths)
    value = _get(header, path)
    op = rng.choice(["type", "type", "value", "value", "value", "key"])
    if op == "key":
        parent = _get(header, path[:-1])
        if isinstance(parent, dict):
            k = path[-1]
            sub = rng.choice(["delete", "rename", "add"])
            if sub == "delete":
                del parent[k]
            elif sub == "rename":
                parent[k + "_x"] = parent.pop(k)
            else:
                parent[rng.choice(["__class__", "auto_map", "_x", "extra_key", "quantization_config"])] = \
                    _weird_value(rng, torch)
            return f"header key {sub} {'.'.join(map(str, path))}"
        sub = rng.choice(["delete", "duplicate", "swap"])
        i = path[-1]
        if sub == "delete":
            del parent[i]
        elif sub == "duplicate":
            parent.insert(i, copy.deepcopy(parent[i]))
        elif len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[i], parent[j] = parent[j], parent[i]
        return f"header list {sub} {'.'.join(map(str, path))}"
    if op == "value" and isinstance(value, (int, float)):
        new = _number_variant(rng, value)
    elif op == "value" and isinstance(value, str):
        new = _string_variant(rng, value)
    elif op == "value" and isinstance(value, list) and value:
        new = rng.choice([value[:-1], value + [value[-1]], list(reversed(value)), [value[0]] * 3])
    else:
        new = _weird_value(rng, torch)
    _set(header, path, new)
    return f"header {op} {'.'.join(map(str, path))} -> {repr(new)[:40]}"


def _reshaped(t, rng: random.Random, torch):
    shape = list(t.shape)
    choice = rng.choice(["shrink", "grow", "transpose", "flatten", "scalar", "extra_dim", "empty"])
    if choice == "transpose" and t.dim() == 2:
        return t.t().contiguous(), choice
    if choice == "flatten":
        return t.reshape(-1).clone(), choice
    if choice == "scalar":
        return torch.tensor(1.0, dtype=t.dtype), choice
    if choice == "extra_dim":
        return t.unsqueeze(0).clone(), choice
    if choice == "empty":
        return t.new_zeros([0] * max(t.dim(), 1)), choice
    if not shape:
        shape = [1]
    d = rng.randrange(len(shape))
    shape[d] = max(0, shape[d] - rng.choice([1, 7])) if choice == "shrink" else shape[d] + rng.choice([1, 8])
    if t.dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8), choice
    return torch.zeros(shape, dtype=t.dtype), choice


def mutate_tensors(obj: dict, rng: random.Random, torch) -> str:
    tensors = obj["tensors"]
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    op = rng.choice(["shape", "shape", "dtype", "dtype", "key", "value", "bits"])
    if op == "shape":
        tensors[name], how = _reshaped(t, rng, torch)
        return f"tensor shape {how} {name}"
    if op == "dtype":
        dtype = rng.choice([torch.float16, torch.float64, torch.int64, torch.uint8, torch.int8, torch.bool,
                            torch.bfloat16, torch.int32, torch.complex64])
        tensors[name] = t.to(dtype)
        return f"tensor dtype {name} -> {dtype}"
    if op == "key":
        sub = rng.choice(["delete", "rename", "add", "non_str"])
        if sub == "delete":
            del tensors[name]
        elif sub == "rename":
            tensors[name + rng.choice(["x", ".__class__", "_"])] = tensors.pop(name)
        elif sub == "add":
            tensors[rng.choice(["basis.99", "shared.99", "x", "model.layers.0.mlp.gate_proj.mask"])] = torch.zeros(3)
        else:
            tensors[rng.choice([7, ("a",), None])] = tensors.pop(name)
        return f"tensor key {sub} {name}"
    if op == "bits" and t.numel():
        flat = t.clone().reshape(-1)
        i = rng.randrange(flat.numel())
        if t.dtype == torch.uint8:
            flat[i] = flat[i] ^ (1 << rng.randrange(8))
        elif t.dtype.is_floating_point:
            flat[i] = rng.choice([float("nan"), float("inf"), 1e30, 0.0])
        tensors[name] = flat.reshape(t.shape)
        return f"tensor element {name}[{i}]"
    tensors[name] = _weird_value(rng, torch)
    return f"tensor value {name} -> non-tensor"


def mutate_tokenizer(obj: dict, rng: random.Random, torch) -> str:
    files = obj["tokenizer_files"]
    op = rng.choice(["add", "truncate", "config", "rename", "type"])
    if op == "add" or not files:
        name = rng.choice(["evil.py", "../tokenizer.json", "tokenizer.model", "vocab.txt", "config.json", "x/y.json"])
        files[name] = rng.choice([b"import os\n", b"{}", b"\xff\xfe", b"a\nb\n"])
        return f"tokenizer add {name}"
    name = rng.choice(sorted(files))
    if op == "truncate":
        files[name] = files[name][: rng.randrange(len(files[name]) + 1)]
    elif op == "config":
        cfg = {"tokenizer_class": rng.choice(["EvilTokenizer", "LlamaForCausalLM", "AutoTokenizer", "os.system"]),
               "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "vocab_file": "/etc/passwd"}
        files["tokenizer_config.json"] = json.dumps(cfg).encode()
    elif op == "rename":
        files[name + ".py"] = files.pop(name)
    else:
        files[name] = _weird_value(rng, torch)
    return f"tokenizer {op} {name}"


def mutate_top(obj: dict, rng: random.Random, torch) -> str:
    key = rng.choice(["format", "format_version", "header", "tokenizer_files", "tensors"])
    obj[key] = rng.choice([None, 2, True, "fips-rt", [], [obj.get(key)], {}, 1.0])
    return f"top {key}"


MUTATORS = ((mutate_header, 6), (mutate_tensors, 4), (mutate_tokenizer, 1), (mutate_top, 1))


def mutated(raw: dict, rng: random.Random) -> tuple[dict, list[str]]:
    import torch
    obj = copy.deepcopy(raw)
    steps = []
    funcs = [f for f, w in MUTATORS for _ in range(w)]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        f = rng.choice(funcs)
        if f is mutate_tokenizer and not isinstance(obj.get("tokenizer_files"), dict):
            continue
        if f is mutate_header and not isinstance(obj.get("header"), dict):
            continue
        if f is mutate_tensors and not (isinstance(obj.get("tensors"), dict) and obj["tensors"]):
            continue
        try:
            steps.append(f(obj, rng, torch))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError):
            steps.append(f"{f.__name__} (no-op)")
    return obj, steps


def mutation_cases(n: int, seed: int, out_dir: Path) -> list[dict]:
    """``n`` seeded mutated checkpoints written (sealed) into ``out_dir``."""
    raws = {name: load_raw(FIXTURES / f"{name}.pt") for name in FIXTURE_NAMES}
    cases = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        base = FIXTURE_NAMES[i % len(FIXTURE_NAMES)]
        obj, steps = mutated(raws[base], rng)
        path = out_dir / f"mut_{i:05d}.pt"
        write_sealed(obj, path)
        cases.append({"id": f"mutation-{i}", "file": str(path), "fixture": base, "mutation": "; ".join(steps)})
    return cases


# ------------------------------------------------------------------------------- crafted attacks
EVIL_PY = """import os, pathlib
pathlib.Path(os.environ.get("{env}", "/tmp/fips_fuzz_marker")).write_text("code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def crafted(out_dir: Path) -> list[dict]:
    """One sealed file per attack class of issue 10 (and a few neighbours); all must be refused
    except where ``expect`` says "accepted" (harmless content that is cleaned, not refused)."""
    import torch
    raws = {name: load_raw(FIXTURES / f"{name}.pt") for name in FIXTURE_NAMES}
    cases = []

    def add(case_id, base, fn, expect="refused"):
        obj = copy.deepcopy(raws[base])
        obj = fn(obj) or obj
        path = out_dir / f"crafted_{case_id}.pt"
        write_sealed(obj, path)
        cases.append({"id": f"crafted-{case_id}", "file": str(path), "fixture": base, "expect": expect,
                      "mutation": case_id})

    fips, delta, dense, deit = FIXTURE_NAMES

    def code_in_tokenizer(o):
        cfg = json.loads(o["tokenizer_files"]["tokenizer_config.json"])
        cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        cfg["tokenizer_class"] = "EvilTokenizer"
        o["tokenizer_files"]["tokenizer_config.json"] = json.dumps(cfg).encode()
        o["tokenizer_files"]["evil.py"] = EVIL_PY.replace("{env}", MARKER_ENV).encode()
    add("code-in-tokenizer-files", fips, code_in_tokenizer)

    def auto_map_only(o):
        cfg = json.loads(o["tokenizer_files"]["tokenizer_config.json"])
        cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        o["tokenizer_files"]["tokenizer_config.json"] = json.dumps(cfg).encode()
    add("auto-map-without-code", fips, auto_map_only, expect="accepted")

    def tokenizer_class_custom(o):
        cfg = json.loads(o["tokenizer_files"]["tokenizer_config.json"])
        cfg["tokenizer_class"] = "EvilTokenizer"
        o["tokenizer_files"]["tokenizer_config.json"] = json.dumps(cfg).encode()
    add("unknown-tokenizer-class", fips, tokenizer_class_custom)

    def tokenizer_reads_other_file(o):
        cfg = json.loads(o["tokenizer_files"]["tokenizer_config.json"])
        cfg["tokenizer_file"] = "/etc/passwd"
        o["tokenizer_files"]["tokenizer_config.json"] = json.dumps(cfg).encode()
    add("tokenizer-file-path-outside", fips, tokenizer_reads_other_file, expect="accepted")

    add("tokenizer-path-traversal", fips, lambda o: o["tokenizer_files"].__setitem__("../tokenizer.json", b"{}"))

    def dunder(path):
        def f(o):
            o["header"]["structure"]["fips_linears"][0]["path"] = path
        return f
    add("dunder-class-forward", fips, dunder("model.layers.0.mlp.__class__.forward"))
    add("dunder-dict", fips, dunder("model.layers.0.mlp.__dict__"))
    add("attribute-not-module", fips, dunder("model.layers.0.mlp.forward"))
    add("path-outside-mlp", fips, dunder("model.layers.0.self_attn.q_proj"))

    def delta_dunder(o):
        o["header"]["structure"]["delta_linears"][0]["path"] = "model.layers.1.mlp.__class__.forward"
    add("dunder-delta-path", delta, delta_dunder)

    def alias_dunder(o):
        o["header"]["structure"]["aliases"]["model.__class__.forward"] = "model.embed_tokens.weight"
    add("dunder-alias", dense, alias_dunder)

    def vocab(n):
        def f(o):
            o["header"]["source"]["config"]["vocab_size"] = n
        return f
    add("huge-vocab", dense, vocab(10 ** 12))
    add("large-vocab", dense, vocab(2 ** 24))
    add("huge-layers", dense, lambda o: o["header"]["source"]["config"].__setitem__("num_hidden_layers", 10 ** 9))
    add("many-layers", dense, lambda o: o["header"]["source"]["config"].__setitem__("num_hidden_layers", 1000))
    add("many-layers-no-tensors", fips,
        lambda o: o["header"]["source"]["config"].__setitem__("num_hidden_layers", 1000))
    add("huge-hidden", dense, lambda o: o["header"]["source"]["config"].__setitem__("hidden_size", 2 ** 20))
    add("huge-intermediate", dense,
        lambda o: o["header"]["source"]["config"].__setitem__("intermediate_size", 2 ** 30))

    def short_mask(o):
        k = "model.layers.0.mlp.gate_proj.mask"
        o["tensors"][k] = o["tensors"][k][:-5].clone()
    add("short-mask", fips, short_mask)

    def long_mask(o):
        k = "model.layers.0.mlp.gate_proj.mask"
        o["tensors"][k] = torch.cat([o["tensors"][k], torch.zeros(3, dtype=torch.uint8)])
    add("long-mask", fips, long_mask)

    def mask_dtype(o):
        k = "model.layers.0.mlp.gate_proj.mask"
        o["tensors"][k] = o["tensors"][k].to(torch.int32)
    add("mask-dtype", fips, mask_dtype)

    def mask_padding(o):
        rec = o["header"]["structure"]["fips_linears"][0]
        r, c = rec["shape"]
        rec["shape"] = [r, c - 3]  # 54 * 125 bits: the last byte has spare bits
        o["header"]["source"]["config"]["intermediate_size"] = c - 3
    add("mask-shape-mismatch", fips, mask_padding)

    def values_count(o):
        k = "model.layers.0.mlp.gate_proj.values"
        o["tensors"][k] = o["tensors"][k][:-1].clone()
    add("values-short", fips, values_count)

    def values_int(o):
        k = "model.layers.0.mlp.gate_proj.values"
        o["tensors"][k] = o["tensors"][k].to(torch.int64)
    add("values-dtype", fips, values_int)

    def v_vs_u(o):
        o["header"]["structure"]["fips_linears"][0]["shape"] = [53, 128]
    add("v-rank-vs-u", fips, v_vs_u)

    def u_shape(o):
        o["tensors"]["basis.0"] = o["tensors"]["basis.0"][:, :50].clone()
    add("u-shape", fips, u_shape)

    def orientation(o):
        o["header"]["structure"]["fips_linears"][0]["orientation"] = "out"
    add("orientation-flip", fips, orientation)

    def delta_rank(o):
        o["header"]["structure"]["delta_linears"][3]["rank"] = 5
    add("delta-rank", delta, delta_rank)

    def delta_a_shape(o):
        k = "model.layers.2.mlp.gate_proj.A"
        o["tensors"][k] = o["tensors"][k][:, :3].clone()
    add("delta-a-shape", delta, delta_a_shape)

    def delta_shared(o):
        o["tensors"]["shared.0"] = o["tensors"]["shared.0"].t().contiguous()
    add("delta-shared-transposed", delta, delta_shared)

    add("non-dict-header", dense, lambda o: o.__setitem__("header", ["not", "a", "dict"]))
    add("non-dict-structure", dense, lambda o: o["header"].__setitem__("structure", "x"))
    add("non-dict-source", dense, lambda o: o["header"].__setitem__("source", 3))
    add("bytes-in-header", dense, lambda o: o["header"].__setitem__("report", {"eval": b"\x00"}))
    add("deep-nesting", dense, lambda o: o["header"].__setitem__("report", _nested(200)))

    def alias_missing(o):
        o["header"]["structure"]["aliases"]["lm_head.weight"] = "no.such.tensor"
    add("alias-to-missing", dense, alias_missing)

    def alias_shape(o):
        o["header"]["structure"]["aliases"]["lm_head.weight"] = "model.norm.weight"
    add("alias-wrong-shape", dense, alias_shape)

    def alias_unknown(o):
        o["header"]["structure"]["aliases"]["no.such.param"] = "model.norm.weight"
    add("alias-unknown-name", dense, alias_unknown)

    for cls in ("AutoModel", "Trainer", "PreTrainedModel", "GPT2LMHeadModel", "os.system"):
        add(f"class-{cls}", dense, lambda o, c=cls: o["header"]["source"].__setitem__("class", c))
    add("model-type-mismatch", dense, lambda o: o["header"]["source"]["config"].__setitem__("model_type", "llama"))
    add("config-auto-map", dense,
        lambda o: o["header"]["source"]["config"].__setitem__("auto_map", {"AutoConfig": "evil.Config"}))

    def timm_kw(key, value):
        def f(o):
            o["header"]["source"]["kwargs"][key] = value
        return f
    add("timm-kwarg-unknown", deit, timm_kw("pretrained_cfg_overlay", {"file": "/etc/passwd"}))
    add("timm-kwarg-checkpoint", deit, timm_kw("checkpoint_path", "/etc/passwd"))
    add("timm-kwarg-type", deit, timm_kw("depth", "2"))
    add("timm-kwarg-range", deit, timm_kw("embed_dim", 10 ** 9))
    add("timm-kwarg-huge-depth", deit, timm_kw("depth", 10 ** 6))
    add("timm-unknown-name", deit, lambda o: o["header"]["source"].__setitem__("name", "os.system"))
    add("timm-image-size", deit, lambda o: o["header"]["extra"].__setitem__("image_size", [3, 4096, 4096]))
    add("sparse-tensor", dense, lambda o: o["tensors"].__setitem__(
        "model.norm.weight", torch.zeros(64).to_sparse()))
    add("format-version", dense, lambda o: o.__setitem__("format_version", 2))

    def expanded(o):  # 8 GiB of embedding from 4 bytes: a stride-0 view, shapes that match the config
        o["header"]["source"]["config"]["vocab_size"] = 2 ** 24
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            o["tensors"][k] = torch.zeros(1).expand(2 ** 24, 64)
    add("stride-0-tensors", dense, expanded)

    def alias_amplification(o):  # 1000 blocks, every one an alias of block 0: a small file, a big model
        cfg = o["header"]["source"]["config"]
        cfg["num_hidden_layers"], cfg["layer_types"] = 1000, ["full_attention"] * 1000
        block0 = [k[len("model.layers.0."):] for k in o["tensors"] if k.startswith("model.layers.0.")]
        o["header"]["structure"]["aliases"] = {f"model.layers.{i}.{k}": f"model.layers.0.{k}"
                                               for i in range(1, 1000) for k in block0}
    add("alias-amplification", dense, alias_amplification)
    return cases


def _nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return {"eval": {"x": v}}


# ------------------------------------------------------------------------------- one case
def run_case(case: dict) -> dict:
    """Load one file in this process and classify the outcome (no crash / hang detection here)."""
    import torch

    from fips_rt.checkpoint import load_checkpoint
    from fips_rt.errors import CheckpointError
    t0 = time.perf_counter()
    try:
        lm = load_checkpoint(case["file"])
    except CheckpointError as e:
        msg = str(e)
        outcome = "refused" if "\n" not in msg and "Traceback" not in msg else "multiline"
        return {"outcome": outcome, "message": msg[:300], "seconds": round(time.perf_counter() - t0, 3)}
    except BaseException as e:  # noqa: BLE001 - the point: classify whatever escapes
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"outcome": "traceback", "message": f"{type(e).__name__}: {str(e)[:300]}",
                "seconds": round(time.perf_counter() - t0, 3)}
    try:
        x = fixture_input(case["fixture"])
        with torch.no_grad():
            if lm.kind == "vit":
                lm.model(x)
            else:
                lm.model(input_ids=x)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"outcome": "delayed", "message": f"{type(e).__name__}: {str(e)[:300]}",
                "seconds": round(time.perf_counter() - t0, 3)}
    return {"outcome": "accepted", "message": "", "seconds": round(time.perf_counter() - t0, 3)}


def _worker() -> None:
    """Read one JSON case per line on stdin, answer one JSON result per line on stdout."""
    import torch
    torch.set_num_threads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not mix with the answers
    for line in sys.stdin:
        case = json.loads(line)
        res = run_case(case)
        out.write(json.dumps(res) + "\n")
        out.flush()


class Worker:
    def __init__(self, env):
        self.env = env
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, text=True,
                                     bufsize=1)

    def run(self, case: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead(t0)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return {"outcome": "hang", "message": f"no answer in {timeout:.0f} s", "seconds": round(timeout, 1)}
        line = self.proc.stdout.readline()
        if not line:
            return self._dead(t0)
        return json.loads(line)

    def _dead(self, t0):
        rc = self.proc.wait()
        self.proc = None
        return {"outcome": "crash", "message": f"worker exit status {rc}",
                "seconds": round(time.perf_counter() - t0, 3)}

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------------------- report
def summarize(results: list[dict]) -> dict:
    counts = {k: 0 for k in ("accepted", "refused") + FAILURES}
    for r in results:
        counts[r["outcome"]] += 1
    crafted_cases = [r for r in results if r["id"].startswith("crafted-")]
    wrong = [r["id"] for r in crafted_cases if r["outcome"] != r.get("expect", "refused")]
    return {"tried": len(results), **counts,
            "mutations": sum(1 for r in results if r["id"].startswith("mutation-")),
            "crafted": len(crafted_cases), "crafted_unexpected": wrong,
            "failures": sum(counts[k] for k in FAILURES)}


def _markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = ["# Checkpoint loader fuzz", "",
             f"`{doc['command']}` on {doc['date']} ({doc['machine'].get('cpu_model')}, "
             f"{doc['machine'].get('usable_cpus') or doc['machine'].get('logical_cpus')} CPUs), "
             f"{doc['seconds']:.0f} s.", "",
             f"{s['mutations']} seeded mutations (seed {doc['seed']}) of the four fixtures in tests/fixtures and "
             f"{s['crafted']} crafted attack files, each re-sealed with a recomputed checksum and loaded by "
             f"`load_checkpoint` in a worker process (a crash or a case over {doc['timeout']:.0f} s is counted, "
             f"the worker restarted).", "",
             "| tried | accepted (forward ran) | refused (one line) | tracebacks | multi-line | delayed failures "
             "| crashes | hangs |", "|---|---|---|---|---|---|---|---|",
             f"| {s['tried']} | {s['accepted']} | {s['refused']} | {s['traceback']} | {s['multiline']} | "
             f"{s['delayed']} | {s['crash']} | {s['hang']} |", ""]
    lines += ["Crafted cases (expected outcome in brackets):", ""]
    for r in doc["results"]:
        if r["id"].startswith("crafted-"):
            lines.append(f"- `{r['id'][8:]}` [{r.get('expect', 'refused')}]: {r['outcome']}"
                         + (f" — {r['message'][:160]}" if r["message"] else ""))
    if s["crafted_unexpected"]:
        lines += ["", f"Unexpected crafted outcomes: {', '.join(s['crafted_unexpected'])}"]
    lines += ["", "Refused mutations by the entry named first (top 15):", ""]
    lines += [f"- {k}: {v}" for k, v in list(doc["refused_by_entry"].items())[:15]]
    accepted = sum(1 for r in doc["results"] if r["id"].startswith("mutation-") and r["outcome"] == "accepted")
    lines += ["", f"Accepted mutations: {accepted} "
              "(changes the loader need not refuse: report/config/version fields, unused extra tensors, "
              "float dtypes of FiPS/DeltaLLM tensors, values of weights, config values a model runs with); "
              "listed in the .json."]
    return "\n".join(lines) + "\n"


def refused_by_entry(results: list[dict]) -> dict[str, int]:
    """How many refused mutations name each entry first (``tensors``, ``header.structure.fips_linears``...)."""
    by: dict[str, int] = {}
    for r in results:
        if r["id"].startswith("mutation-") and r["outcome"] == "refused":
            key = r["message"].split(": ", 2)[1] if r["message"].count(": ") >= 2 else r["message"][:60]
            key = key.split("[")[0].split("(")[0].strip()[:50]
            by[key] = by.get(key, 0) + 1
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000, help="mutated checkpoints (plus every crafted one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds after which a case counts as a hang")
    ap.add_argument("--no-write", action="store_true", help="print the summary only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz_checkpoints"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fips-fuzz-") as tmp:
        tmp = Path(tmp)
        marker = tmp / "code-ran.marker"
        env = dict(os.environ, **{MARKER_ENV: str(marker)}, TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cases = crafted(tmp) + mutation_cases(args.cases, args.seed, tmp)
        worker = Worker(env)
        try:
            for i, case in enumerate(cases):
                res = worker.run(case, args.timeout)
                if res["message"].startswith(case["file"]):  # the temporary path says nothing
                    res["message"] = Path(case["file"]).name + res["message"][len(case["file"]):]
                results.append({**{k: case[k] for k in ("id", "fixture", "mutation")},
                                **({"expect": case["expect"]} if "expect" in case else {}), **res})
                Path(case["file"]).unlink(missing_ok=True)
                if (i + 1) % 100 == 0:
                    print(f"{i + 1}/{len(cases)} cases", file=sys.stderr)
        finally:
            worker.stop()
        code_ran = marker.exists()
    summary = summarize(results)
    summary["code_executed"] = code_ran
    try:
        from fips_rt.runtime.bench import machine_info
        machine = machine_info()
    except Exception:  # noqa: BLE001 - the summary is still useful without it
        machine = {"platform": sys.platform}
    cmd = "nice -n 10 python benchmarks/fuzz_checkpoints.py " + " ".join(a for a in (argv or sys.argv[1:]))
    doc = {"command": cmd.strip(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "seed": args.seed, "timeout": args.timeout, "seconds": round(time.time() - t0, 1), "machine": machine,
           "summary": summary, "refused_by_entry": refused_by_entry(results),
           # crafted cases in full; of the mutations, the accepted ones (the refused are counted above,
           # and every case is reproducible from the seed)
           "results": [r for r in results if r["id"].startswith("crafted-") or r["outcome"] != "refused"]}
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        Path(args.out + ".md").write_text(_markdown(doc))
    ok = summary["failures"] == 0 and not summary["crafted_unexpected"] and not code_ran
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
