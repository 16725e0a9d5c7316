"""Memory-bounded FiPS: block-by-block onloading from a folder of (sharded) safetensors.

The model is built on the meta device; only the embeddings, the final norm and the head are loaded.
Calibration runs one block at a time (the sequential pipeline of llm-compressor / GPTQ): the inputs of
block 0 are captured once, then each block is loaded, run on every calibration batch, its MLP
statistics and teacher I/O recorded, and put back on the meta device. Per group, the shared init reads
that group's MLP weights only and goes to the state folder; one global threshold (exact, from
histograms: fips_rt.selection) allots the V entries; then each group is trained/refitted alone and
stored packed (values + bitmask). The checkpoint is assembled from the packed groups and the unchanged
tensors read back from the safetensors. Peak memory: the non-block weights + one block + the
calibration activations (offloaded to the state folder past ``activation_memory_gb``) + one group's
working set; no dense copy of the model. With ``fips_rt.distributed`` the groups are spread over ranks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from . import distributed as D
from .adapters import (
    adapter_for,
    block_paths,
    get_submodule,
    linear_paths,
    set_submodule,
)
from .budget import kept_nnz
from .capture import Tokens, _io_hooks, _statistics_hooks, hooks_removed
from .config import FipsConfig
from .decompose import score_of
from .errors import FipsError
from .fips import (
    GroupPlan,
    group_whitening,
    init_group,
    plan_groups,
    refit_group,
    train_group_local,
)
from .modules import FipsLinear, SharedBasis
from .procmem import ProcessMemory, release_freed_memory
from .selection import (
    Threshold,
    finish,
    hi_histogram,
    lo_histogram,
    magnitude_masks,
    upper_bin,
)
from .sparsity import nm_mask

GiB = 2**30


# ----------------------------------------------------------------------------- weights on disk
class WeightFiles:
    """Tensor name -> safetensors file of a Hugging Face folder (one file or an index of shards)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise FipsError(f"{index} is not a safetensors index (no weight_map).") from None
            if not isinstance(wm, dict) or not all(isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
                                                   for v in wm.values()):
                raise FipsError(f"{index}: weight_map must map names to .safetensors files of the folder.")
            self.files = {k: self.folder / v for k, v in wm.items()}
        elif single.is_file():
            from safetensors import safe_open
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise FipsError(f"{folder} has no model.safetensors (or index): block-by-block onloading reads safetensors.")
        for f in set(self.files.values()):
            if not f.is_file():
                raise FipsError(f"{f} is named in the index but missing.")

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as float32 CPU tensors (each file opened once, closed after)."""
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise FipsError(f"{self.folder}: tensor {n} is missing from the safetensors.")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), "pt") as h:
                for n in ns:
                    t = h.get_tensor(n)
                    out[n] = t.float() if t.dtype != torch.float32 else t
        return out

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


def streamable(spec: str) -> bool:
    """A local Hugging Face folder with safetensors weights (what block-by-block onloading reads)."""
    p = Path(spec)
    return p.is_dir() and (p / "config.json").is_file() and (
        (p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file())


def _set(model, name: str, t: torch.Tensor) -> None:
    mod_path, _, attr = name.rpartition(".")
    mod = get_submodule(model, mod_path) if mod_path else model
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    if old is not None and tuple(old.shape) != tuple(t.shape):
        raise FipsError(f"tensor {name} has shape {list(t.shape)} in the safetensors but {list(old.shape)} in "
                        f"config.json's architecture.")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


class Skeleton:
    """The model on the meta device with its non-block tensors loaded; blocks come and go."""

    def __init__(self, folder: str):
        import transformers
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoTokenizer

        from .models import LoadedModel, _hf_config_dict, hf_classes, tokenizer_files
        self.folder = Path(folder)
        try:
            config = AutoConfig.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a user's folder: one line
            raise FipsError(f"Cannot read a Hugging Face config from {folder}: {str(e).splitlines()[0]}") from None
        archs = [a for a in (getattr(config, "architectures", None) or []) if a in hf_classes()]
        if not archs or not archs[0].endswith("ForCausalLM"):
            raise FipsError(f"{folder}: block-by-block onloading supports the causal LMs of the adapters "
                            f"({', '.join(c for c in hf_classes() if c.endswith('ForCausalLM'))}); "
                            f"config.json names {getattr(config, 'architectures', None)}.")
        cls = getattr(transformers, archs[0])
        self.weights = WeightFiles(self.folder)
        with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
            model = cls(config)
        model.eval()
        self.adapter = adapter_for(model)
        self.blocks = [bp for stage in block_paths(model, self.adapter) for bp in stage]
        prefixes = tuple(b + "." for b in self.blocks)
        names = [n for n, _ in model.named_parameters() if not n.startswith(prefixes)]
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            names = [n for n in names if self.weights.has(n) or n != "lm_head.weight"]
        for n, t in self.weights.read(names).items():
            _set(model, n, t)
        if tied:
            model.tie_weights()
        self._resident, self._tied = names, tied
        left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefixes)]
        if left:
            raise FipsError(f"{folder}: tensors missing from the safetensors: {', '.join(left[:3])}.")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        try:
            tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
        except Exception:  # noqa: BLE001 - token ids still work
            tok = None
        source = {"type": "hf", "class": type(model).__name__, "config": _hf_config_dict(model.config),
                  "tokenizer_files": tokenizer_files(tok)}
        self.lm = LoadedModel(model=model, tokenizer=tok, adapter=self.adapter, source=source, name=str(folder))
        self._meta: dict[str, torch.Tensor] = {}

    def unload_resident(self) -> None:
        """Embeddings, final norm and head back to meta (the local phase and the checkpoint writer do not
        need them in memory: the writer reads them from the safetensors)."""
        for n in self._resident:
            t = get_submodule(self.model, n.rpartition(".")[0]) if "." in n else self.model
            p = getattr(t, n.rpartition(".")[2])
            _set(self.model, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        if self._tied:
            self.model.tie_weights()

    def block(self, i: int):
        return get_submodule(self.model, self.blocks[i])

    def load_block(self, i: int) -> None:
        pre = self.blocks[i] + "."
        names = [pre + n for n, p in self.block(i).named_parameters() if p.is_meta]
        for n, t in self.weights.read(names).items():
            _set(self.model, n, t)

    def unload_block(self, i: int) -> None:
        pre = self.blocks[i] + "."
        for n, p in list(self.block(i).named_parameters()):
            if not p.is_meta:
                _set(self.model, pre + n, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def oriented(self, plan: GroupPlan) -> list[torch.Tensor]:
        """The group's dense MLP weights read from disk, each d x d_ff."""
        got = self.weights.read([p + ".weight" for p, _ in plan.linears])
        return [got[p + ".weight"].T if o == "in" else got[p + ".weight"] for p, o in plan.linears]

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values()
                   if not p.is_meta)

    def block_bytes(self) -> int:
        return max(sum(p.numel() * 4 for p in self.block(i).parameters()) for i in range(len(self.blocks)))


# ----------------------------------------------------------------------------- one pass, block by block
class _Stop(Exception):
    pass


@torch.no_grad()
def _block0_inputs(sk: Skeleton, batches: list[dict]) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
    """Per calibration batch: (hidden states into block 0, the block's keyword arguments, token mask)."""
    caught = []

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        caught.append((h, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop
    handle = sk.block(0).register_forward_pre_hook(pre, with_kwargs=True)
    out = []
    with hooks_removed([handle]):
        for b in batches:
            try:
                sk.model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
            except _Stop:
                pass
            m = b.get("attention_mask")
            h, kw = caught.pop()
            out.append((h, kw, None if m is None else m.reshape(-1).bool()))
    return out


def _io_bytes(d: int, tokens: int, n_layers: int) -> int:
    return 2 * 4 * d * tokens * n_layers


@torch.no_grad()
def calibration_pass(sk: Skeleton, plans: list[GroupPlan], cfg: FipsConfig, batches, *, stat_groups: list[GroupPlan],
                     io_groups: list[GroupPlan], state: Path, progress=False, log=print, mem=None) -> tuple[dict, dict]:
    """Run the calibration batches block by block up to the last layer any of ``stat_groups`` /
    ``io_groups`` needs. Returns (whitening per group index of stat_groups, {layer: (X, Y) or a file
    path} for the layers of io_groups)."""
    from tqdm.auto import tqdm
    layers = linear_paths(sk.model, sk.adapter)
    need_stats = {li for p in stat_groups for li in p.layers} if cfg.init == "whitened" else set()
    need_io = {li for p in io_groups for li in p.layers}
    if not (need_stats or need_io):
        return {}, {}
    last = max(need_stats | need_io)
    ins = _block0_inputs(sk, batches)
    tokens = sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1] for h, _, m in ins)
    d = ins[0][0].shape[-1]
    offload = _io_bytes(d, tokens, len(need_io)) > cfg.activation_memory_gb * GiB
    stats: dict = {}
    whitening: dict = {}
    io: dict = {}
    tok = Tokens()
    bar = tqdm(range(last + 1), desc="calibration, block by block", disable=not progress, leave=False)
    for li in bar:
        sk.load_block(li)
        xs, ys = ({li: []}, {li: []}) if li in need_io else ({}, {})
        handles = []
        if li in need_stats:
            handles += _statistics_hooks(sk.model, sk.adapter, layers, tok, stats, layer_ids={li})
        if li in need_io:
            handles += _io_hooks(sk.model, sk.adapter, [li], tok, xs, ys)
        block = sk.block(li)
        with hooks_removed(handles):
            for j, (h, kw, m) in enumerate(ins):
                tok.mask = m
                out = block(h, **kw)
                ins[j] = (out[0] if isinstance(out, tuple) else out, kw, m)
        sk.unload_block(li)
        if li in need_io:
            X, Y = torch.cat(xs[li]), torch.cat(ys[li])
            if offload:
                f = state / f"act_{li:03d}.pt"
                torch.save({"X": X, "Y": Y}, f)
                io[li] = f
            else:
                io[li] = (X, Y)
            del X, Y, xs, ys
        for p in stat_groups:  # a group's statistics reduce to its whitening as soon as its last layer ran
            if p.layers[-1] == li and cfg.init == "whitened":
                whitening[p.index] = group_whitening(p, cfg, stats)
                for lj in p.layers:
                    stats.pop(lj, None)
    if offload:
        log(f"calibration activations ({_io_bytes(d, tokens, len(need_io)) / GiB:.1f} GiB) exceed "
            f"activation_memory_gb {cfg.activation_memory_gb:g}: offloaded to {state}")
    return whitening, io


def _take_io(io: dict, layers: list[int]) -> tuple[dict, dict]:
    X, Y = {}, {}
    for li in layers:
        v = io.pop(li)
        if isinstance(v, Path):
            obj = torch.load(str(v), map_location="cpu", weights_only=True)
            v.unlink()
            v = (obj["X"], obj["Y"])
        X[li], Y[li] = v
    return X, Y


# ----------------------------------------------------------------------------- memory plan
def plan_memory(sk: Skeleton, plans: list[GroupPlan], cfg: FipsConfig, tokens: int, local_ranks: int = 1) -> dict:
    """Bytes the run will need at its peak (an estimate, per process and for the machine)."""
    d = max(p.d for p in plans)
    needs_io = cfg.steps > 0 or cfg.refit != "none"
    io_all = _io_bytes(d, tokens, sum(len(p.layers) for p in plans)) if needs_io else 0
    act = min(io_all, int(cfg.activation_memory_gb * GiB)) if needs_io else 0
    group = 0
    for p in plans:
        v = p.rank * len(p.linears) * p.d_ff * 4
        dense = len(p.linears) * p.d * p.d_ff * 4
        init = v + dense + p.d * p.d_ff * 4 + p.d * p.rank * 8
        # V, its mask; training: two AdamW moments + the gradient of one tensor at a time (stepped in backward)
        train = v * (3 if cfg.steps > 0 else 1) + v // 4 + ((p.rank + p.d) * max(p.d_ff, p.rank) * 4 if cfg.steps > 0 else 0)
        refit = (dense + 2 * p.d_ff * p.d_ff * 4 + p.d * p.d * 4) if cfg.refit != "none" else 0
        io_group = _io_bytes(p.d, tokens, len(p.layers)) if needs_io else 0
        group = max(group, init, train + refit + io_group)
    packed = sum(int(p.rank * len(p.linears) * p.d_ff * (1 - cfg.sparsity)) * 4 + p.rank * len(p.linears) * p.d_ff // 8
                 + p.d * p.rank * 4 for p in plans)
    unchanged = sk.weights.total_bytes() - sum(len(p.linears) * p.d * p.d_ff * 4 for p in plans)
    calib_hidden = 3 * tokens * d * 4
    work = sk.resident_bytes() + sk.block_bytes() + calib_hidden  # calibration pass
    write = sk.resident_bytes() + packed + unchanged
    work = max(work, sk.block_bytes() + act + group + calib_hidden)
    per_rank = max(work, write) + int(0.8 * GiB)  # + the interpreter, torch, transformers, tokenizer, text
    return {"resident_weights": sk.resident_bytes(), "block": sk.block_bytes(), "activations": act,
            "group_working_set": group, "checkpoint_assembly": write, "per_process": per_rank,
            "machine": per_rank * local_ranks}


def plan_disk(sk: Skeleton, plans: list[GroupPlan], cfg: FipsConfig, tokens: int, world: int = 1) -> dict:
    """Bytes the run writes to the disk of its state folder and checkpoint at the peak (an estimate):
    offloaded activations + every group's init while the allocation waits for them (compact without
    local steps: about the entries the running bound keeps, see ``_bound_bin``), then the packed
    groups + the checkpoint (the state folder is removed after the checkpoint is written)."""
    needs_io = cfg.steps > 0 or cfg.refit != "none"
    io_all = sum(_io_bytes(p.d, tokens, len(p.layers)) for p in plans) if needs_io else 0
    acts = io_all if io_all > cfg.activation_memory_gb * GiB else 0
    keep = sum(kept_nnz(p.rank, len(p.linears) * p.d_ff, cfg.sparsity) for p in plans)
    compact = cfg.steps == 0 and cfg.pruning != "nm"
    inits = 0
    for rk in range(max(1, world)):  # each rank bounds with the groups it initialized itself
        cum = 0
        for p in plans[rk::max(1, world)]:
            n = p.rank * len(p.linears) * p.d_ff
            cum += n
            frac = min(1.0, keep / cum + 0.05) if compact else 1.0
            inits += int(n * (4 * frac + (0.125 if compact and frac < 1 else 0))) + p.d * p.rank * 4 \
                + len(p.linears) * (p.d_ff * 4 + 8 * (1 << 16))
    packed = sum(int(p.rank * len(p.linears) * p.d_ff * (1 - cfg.sparsity)) * 4 + p.rank * len(p.linears) * p.d_ff // 8
                 + p.d * p.rank * 4 for p in plans)
    mlp = {pth + ".weight" for p in plans for pth, _ in p.linears}
    unchanged = sum(t.numel() * 4 for n, t in {id(t): (n, t) for n, t in sk.model.state_dict(keep_vars=True).items()
                                                if n not in mlp}.values())
    checkpoint = packed + unchanged + (1 << 20)
    return {"activations": acts, "inits": inits, "packed_groups": packed, "checkpoint": checkpoint,
            "peak": max(acts + inits, packed + checkpoint)}


def disk_free(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    import shutil
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(e: BaseException) -> bool:
    """An exception that means a write failed for lack of space: OSError ENOSPC / EDQUOT, or torch's zip
    writer failing mid-file (it reports a short write as a RuntimeError, not an OSError)."""
    import errno
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(t in msg for t in (
        "No space left", "file write failed", "unexpected pos", "failed writing file"))


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _written() -> int:
    """Bytes this process has written (``wchar`` of /proc/self/io: files, before the page cache)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PhaseMemory:
    """Peak RSS, wall time and bytes written per phase (VmHWM, reset at each phase start where Linux
    allows; /proc/self/io)."""

    def __init__(self):
        self.pm = ProcessMemory()
        self.phases: dict[str, dict] = {}
        self._cur = None
        self._t = time.time()
        self.overall = 0

    def start(self, name: str) -> None:
        self.end()
        self._cur = name
        self._t = time.time()
        self._w = _written()
        self.pm.start_peak()

    def end(self) -> None:
        if self._cur is None:
            return
        peak = self.pm.peak()
        ph = self.phases.setdefault(self._cur, {"seconds": 0.0, "peak_rss": 0, "bytes_written": 0})
        ph["seconds"] += time.time() - self._t
        ph["bytes_written"] += _written() - self._w
        ph["peak_rss"] = max(ph["peak_rss"], peak)
        self.overall = max(self.overall, peak)
        self._cur = None


# ----------------------------------------------------------------------------- group state (packed)
def _state_file(state: Path, kind: str, g: int) -> Path:
    return state / f"{kind}_{g:03d}.pt"


def _save(obj: dict, f: Path) -> None:
    """torch.save under a temporary name, then rename (a failed write leaves no temporary behind)."""
    tmp = f.with_name("." + f.name + ".tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(f)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_temporaries(state: Path) -> None:
    """The state folder's half-written files (``.NAME.tmp``) and offloaded activations (recomputed by a
    resumed run): what a failed run leaves that nothing can use."""
    if Path(state).is_dir():
        for f in list(Path(state).glob(".*.tmp")) + list(Path(state).glob("act_*.pt")):
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- compact init state
# The init of each group waits in the state folder for the global allocation. With no local steps
# (init only / refits) only entries that can be kept matter, and the global threshold is at least the
# keep-th largest score among the groups initialized so far (a subset): entries whose score key lies
# below that bound's histogram bin can never be kept, so the init stores the others as values + packed
# bitmask (the checkpoint's sparse format, float32). The lo pass of the allocation and the masks read
# the stored entries only (the rest score -1): the same threshold and masks as from the dense V.
def _bound_bin(seen: torch.Tensor, keep: int) -> int | None:
    """The upper-16-bit bin of the keep-th largest key counted in ``seen`` ([65536] histogram), or
    None when fewer than ``keep`` entries were counted (no bound yet)."""
    from .selection import _from_top
    if keep <= 0 or int(seen.sum()) < keep:
        return None
    return int((_from_top(seen) >= keep).nonzero().max())


def _bin_floor(b: int) -> float | None:
    """The smallest float32 score whose key lies in upper bin ``b`` (None: a bin of negative scores)."""
    if b < 1 << 15:
        return None
    return float(torch.tensor([(b << 16) - (1 << 31)], dtype=torch.int32).view(torch.float32))


def _init_v(ini: dict, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear j of a stored init: (dense V, stored-entries mask or None when all are stored)."""
    from .sparse_format import unpack, unpack_mask
    if "V" in ini:
        return ini["V"][j], None
    pm = ini["masks"][j].contiguous().numpy()
    shape = tuple(ini["shapes"][j])
    return (torch.from_numpy(unpack(ini["values"][j].contiguous().numpy(), pm, shape)),
            torch.from_numpy(unpack_mask(pm, shape)))


def _masked_score(v: torch.Tensor, c: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
    s = score_of(v, c)
    return s if stored is None else s.masked_fill_(~stored, -1.0)


def _save_threshold(state: Path, th: Threshold) -> None:
    f = state / "threshold.json"
    tmp = f.with_name("." + f.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"key": th.key, "all": th.all, "quotas": th.quotas, "kept": th.kept}))
        tmp.replace(f)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_threshold(state: Path) -> Threshold | None:
    f = state / "threshold.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        return Threshold(d["key"], all=bool(d["all"]), quotas=d["quotas"], kept=d["kept"])
    except (ValueError, KeyError, TypeError):
        raise FipsError(f"--resume: {f} is damaged; rerun without --resume.") from None


def _load(f: Path, plan: GroupPlan) -> dict:
    obj = torch.load(str(f), map_location="cpu", weights_only=True)
    if obj.get("layers") != plan.layers or obj.get("rank") != plan.rank:
        raise FipsError(f"--resume: {f} was made with other settings (layers/rank differ); use a new --state-dir.")
    return obj


def _pack_group(plan: GroupPlan, mods: list[FipsLinear], info: dict) -> dict:
    vals, masks, biases = [], [], []
    for m in mods:
        v, pm = m.packed()
        vals.append(torch.from_numpy(v))
        masks.append(torch.from_numpy(pm))
        biases.append(None if m.bias is None else m.bias.detach().float().cpu())
    return {"U": mods[0].basis.weight.detach().float().cpu().contiguous(), "values": vals, "masks": masks,
            "bias": biases, "shapes": [list(m.V.shape) for m in mods], "nnz": [m.nnz for m in mods],
            "orientations": [m.orientation for m in mods], "info": info, "layers": plan.layers, "rank": plan.rank}


_META = ("shapes", "nnz", "orientations", "info", "layers", "rank")


def _group_tensors(obj: dict) -> list[torch.Tensor]:
    """A packed group as a flat list of tensors (its JSON metadata first, as bytes) for sending."""
    head = json.dumps({k: obj[k] for k in _META}, default=str).encode()
    out = [torch.frombuffer(bytearray(head), dtype=torch.uint8), obj["U"]]
    for v, m, b in zip(obj["values"], obj["masks"], obj["bias"]):
        out += [v, m, torch.zeros(0) if b is None else b]
    return out


def _group_from_tensors(ts: list[torch.Tensor], plan: GroupPlan) -> dict:
    meta = json.loads(bytes(ts[0].tolist()).decode())
    if meta.get("layers") != plan.layers or meta.get("rank") != plan.rank or len(ts) != 2 + 3 * len(plan.linears):
        raise FipsError(f"group {plan.index} arrived from its rank with other settings.")
    vals, masks, biases = [], [], []
    for i in range(len(plan.linears)):
        v, m, b = ts[2 + 3 * i: 5 + 3 * i]
        vals.append(v)
        masks.append(m)
        biases.append(None if b.numel() == 0 else b)
    return dict(meta, U=ts[1], values=vals, masks=masks, bias=biases)


# ----------------------------------------------------------------------------- the run
def compress_streamed(folder: str, cfg: FipsConfig, batches: list[dict] | None, *, sk: Skeleton | None = None,
                      device: torch.device, state_dir: Path, resume: bool = False, progress: bool = False,
                      ranks: D.Ranks | None = None, log=print, mem: PhaseMemory | None = None) -> dict:
    """Compress the safetensors folder group by group. Rank 0 returns {"groups": packed states in
    order, "plans": plans, "report": ...}; other ranks return None after sending their groups."""
    r = ranks or D.Ranks()
    mem = mem or PhaseMemory()
    release_freed_memory()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    sk = sk or Skeleton(folder)
    if cfg.selection != "magnitude":
        raise FipsError(f"selection {cfg.selection!r} is not supported by block-by-block onloading (it keeps only "
                        "the diagonal statistics of each layer); use selection 'magnitude' or the in-memory engine.")
    if cfg.global_steps > 0:
        raise FipsError("global distillation steps need the whole model in memory; block-by-block onloading "
                        "(and --distributed) runs local error minimization only: use --global-steps 0.")
    plans, budget = plan_groups(sk.model, sk.adapter, cfg)
    if (cfg.init == "whitened" or cfg.steps > 0 or cfg.refit != "none") and not batches:
        raise FipsError("FiPS with whitened init or training needs calibration data.")
    needs_io = cfg.steps > 0 or cfg.refit != "none"
    state = Path(state_dir)
    meta = {"config": cfg.to_dict(), "groups": [p.layers for p in plans], "ranks": [p.rank for p in plans],
            "engine": "streamed", "state_format": 2}
    if r.rank == 0:
        state.mkdir(parents=True, exist_ok=True)
        meta_file = state / "plan.json"
        if resume and meta_file.is_file():
            if json.loads(meta_file.read_text()) != json.loads(json.dumps(meta)):
                raise FipsError(f"--resume: {state} holds a run with other settings; use a new --state-dir.")
        elif not resume:
            for f in (list(state.glob("group_*.pt")) + list(state.glob("init_*.pt")) + list(state.glob("act_*.pt"))
                      + list(state.glob("threshold.json"))):
                f.unlink()
        meta_file.write_text(json.dumps(meta))
    D.barrier(r, "preparing the state folder")
    mine = [p for p in plans if r.owns(p.index)]
    done = {p.index for p in mine if _state_file(state, "group", p.index).is_file()}
    inited = {p.index for p in mine if _state_file(state, "init", p.index).is_file()}
    for p in mine:
        if p.index in done:
            _load(_state_file(state, "group", p.index), p)  # settings check
    th: Threshold | None = _load_threshold(state) if resume and cfg.pruning != "nm" else None
    need_hist = cfg.pruning != "nm" and th is None
    missing = [p.index for p in mine if p.index not in done and p.index not in inited]
    if resume and ((need_hist and done) or (th is not None and missing)):
        raise FipsError(f"--resume: {state} is incomplete (groups finished without the allocation, or the "
                        f"allocation without every init); rerun without --resume.")
    # 1. calibration statistics and teacher I/O, block by block
    mem.start("statistics")
    stat_groups = [p for p in mine if p.index not in inited and p.index not in done]
    io_groups = [p for p in mine if p.index not in done] if needs_io else []
    whitening, io = calibration_pass(sk, plans, cfg, batches or [], stat_groups=stat_groups, io_groups=io_groups,
                                     state=state, progress=progress, log=log, mem=mem) \
        if (stat_groups and cfg.init == "whitened") or io_groups else ({}, {})
    sk.unload_resident()  # from here on only MLP chains run (the checkpoint writer reads the rest from disk)
    # 2. shared init of my groups, one at a time, to the state folder; pass 1 of the global allocation
    mem.start("init")
    n_lin = [len(p.linears) for p in plans]
    offs = [sum(n_lin[:i]) for i in range(len(plans))]
    total_t = sum(n_lin)
    total_keep = sum(kept_nnz(p.rank, len(p.linears) * p.d_ff, cfg.sparsity) for p in plans)
    compact = cfg.steps == 0 and cfg.pruning != "nm"  # local steps start from (nearly) the whole V
    hi = torch.zeros(total_t, 1 << 16, dtype=torch.int64) if need_hist else None
    seen = torch.zeros(1 << 16, dtype=torch.int64)  # pass-1 counts of the groups initialized so far
    for p in mine:
        if p.index in done:
            continue
        f = _state_file(state, "init", p.index)
        if p.index in inited:
            if need_hist:
                rows = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                if rows.get("layers") != p.layers or rows.get("rank") != p.rank:
                    raise FipsError(f"--resume: {f} was made with other settings; use a new --state-dir.")
                hi[offs[p.index]:offs[p.index] + n_lin[p.index]] = rows["hi"]
                seen += rows["hi"].sum(0)
                del rows
            continue
        t1 = time.time()
        w = sk.oriented(p)
        ini_obj = init_group(sk.model, p, cfg, None, weights=w, whitening=whitening.get(p.index))
        del w
        rows = torch.stack([hi_histogram(score_of(v, c)) for v, c in zip(ini_obj.V, ini_obj.col_scale)])
        if need_hist:
            hi[offs[p.index]:offs[p.index] + n_lin[p.index]] = rows
        seen += rows.sum(0)
        ini = {"U": ini_obj.U, "col_scale": ini_obj.col_scale, "layers": p.layers, "rank": p.rank,
               "seconds": time.time() - t1, "hi": rows}
        b = _bound_bin(seen, total_keep) if compact else None
        floor = None if b is None else _bin_floor(b)
        if floor is None:
            ini["V"] = ini_obj.V
        else:
            from .sparse_format import pack_mask
            ini.update(values=[], masks=[], shapes=[])
            for j, (v, c) in enumerate(zip(ini_obj.V, ini_obj.col_scale)):
                keep = score_of(v, c) >= floor
                ini["values"].append(v[keep].contiguous())
                ini["masks"].append(torch.from_numpy(pack_mask(keep.numpy())))
                ini["shapes"].append(list(v.shape))
                ini_obj.V[j] = None
                del keep, v
        del ini_obj
        _save(ini, f)
        if progress:
            log(f"group {p.index} (layers {p.layers[0]}-{p.layers[-1]}, rank {p.rank}): init in "
                f"{ini['seconds']:.0f} s")
        del ini
        release_freed_memory()
    if cfg.pruning != "nm":
        if th is None:
            hi = D.all_sum(r, hi, "summing the allocation histograms")
            upper, th = upper_bin(hi, total_keep)
            if th is None:
                lo = torch.zeros_like(hi)
                for p in mine:
                    ini = _load(_state_file(state, "init", p.index), p)
                    for j, c in enumerate(ini["col_scale"]):  # one V at a time
                        v, stored = _init_v(ini, j)
                        lo[offs[p.index] + j] = lo_histogram(_masked_score(v, c, stored), upper)
                        del v, stored
                    del ini
                lo = D.all_sum(r, lo, "summing the allocation histograms")
                th = finish(hi, lo, upper, total_keep)
            if r.rank == 0:  # a resumed run starts its local phase from here
                _save_threshold(state, th)
        for p in plans:  # every group's share of the global budget (the same on every rank)
            p.nnz = sum(th.kept[offs[p.index]:offs[p.index] + len(p.linears)])
    else:
        for p in plans:
            p.nnz = kept_nnz(p.rank, len(p.linears) * p.d_ff, cfg.sparsity)
    del hi
    # 3. local phase per group: masks, refit / steps, pack
    mem.start("local")
    infos: dict[int, dict] = {}
    for p in mine:
        f = _state_file(state, "group", p.index)
        if p.index in done:
            infos[p.index] = dict(_load(f, p)["info"], resumed=True)
            if needs_io:
                for li in p.layers:
                    io.pop(li, None)
            log(f"group {p.index}: resumed from {state}")
            continue
        init_file = _state_file(state, "init", p.index)
        ini = _load(init_file, p)
        col_scales = ini["col_scale"]
        vs = [_init_v(ini, j) for j in range(len(col_scales))]
        for k in ("V", "values", "masks"):  # the dense V's above are the only copy kept
            ini.pop(k, None)
        if cfg.pruning == "nm":
            masks = [nm_mask(_masked_score(v, c, st), *cfg.nm) for (v, st), c in zip(vs, col_scales)]
        elif cfg.steps > 0:
            start_keep = min(sum(v.numel() for v, _ in vs),
                             int(round(p.nnz * (1 - cfg.initial_sparsity) / max(1 - cfg.sparsity, 1e-9))))
            masks = magnitude_masks([_masked_score(v, c, st) for (v, st), c in zip(vs, col_scales)], start_keep)
        else:
            masks = [th.mask(offs[p.index] + j, _masked_score(v, c, st)) for j, ((v, st), c) in
                     enumerate(zip(vs, col_scales))]
        vs = [v for v, _ in vs]  # the stored-entries masks are done with
        info: dict = {}
        originals = {path: get_submodule(sk.model, path) for path, _ in p.linears}
        biases = [None] * len(p.linears)
        bias_names = [path + ".bias" for path, _ in p.linears]
        if any(sk.weights.has(n) for n in bias_names):
            got = sk.weights.read([n for n in bias_names if sk.weights.has(n)])
            biases = [got.get(n) for n in bias_names]
        basis = SharedBasis(ini["U"].to(device))
        del ini
        mods = []
        for j, ((path, orient), msk) in enumerate(zip(p.linears, masks)):
            V = vs[j]
            vs[j] = None
            mod = FipsLinear(basis, V.to(device), msk.to(device), orient, None if biases[j] is None else biases[j].to(device))
            del V
            set_submodule(sk.model, path, mod)
            mods.append(mod)
        del vs, masks
        if needs_io:
            X, Y = _take_io(io, p.layers)
            t1 = time.time()
            dense_w = sk.oriented(p) if cfg.refit != "none" else None
            if cfg.refit in ("before", "both") or (cfg.refit == "after" and cfg.steps == 0):
                info.update({f"{k}_before": v for k, v in
                             refit_group(sk.model, sk.adapter, p, mods, dense_w, X, Y, cfg, device).items()})
            if cfg.steps > 0:
                info.update(train_group_local(sk.model, sk.adapter, p, mods, col_scales, cfg, X, Y, device, progress))
                if cfg.refit in ("after", "both"):
                    info.update({f"{k}_after": v for k, v in
                                 refit_group(sk.model, sk.adapter, p, mods, dense_w, X, Y, cfg, device).items()})
            info["seconds_local"] = time.time() - t1
            del X, Y, dense_w
        info.update(layers=p.layers, rank=p.rank, nnz=sum(m.nnz for m in mods),
                    density=sum(m.nnz for m in mods) / sum(m.mask.numel() for m in mods))
        packed = _pack_group(p, mods, info)
        for path, _ in p.linears:
            set_submodule(sk.model, path, originals[path])
        del mods, basis
        _save(packed, f)
        init_file.unlink(missing_ok=True)  # the packed group supersedes its init (resume reads the group)
        infos[p.index] = info
        if progress:
            log(f"group {p.index} (layers {p.layers[0]}-{p.layers[-1]}, rank {p.rank}): "
                + (f"loss {info.get('loss_first') or 0:.4f} -> {info.get('loss_last') or 0:.4f}, "
                   if "loss_first" in info else "")
                + ", ".join(f"{k} {v:.4f}" for k, v in info.items() if k.startswith("refit_"))
                + f" ({info.get('seconds_local', 0):.0f} s)")
        del packed
        release_freed_memory()
    # 4. factors to rank 0
    mem.start("gather")
    groups: dict[int, dict] = {}
    if r.active:
        for p in plans:
            owner = r.owner(p.index)
            if owner == 0:
                continue
            if r.rank == owner:
                obj = torch.load(str(_state_file(state, "group", p.index)), map_location="cpu", weights_only=True)
                D.send_tensors(r, _group_tensors(obj), 0)
                del obj
            elif r.rank == 0:
                ts = D.recv_tensors(r, owner)
                groups[p.index] = ts
    mem.end()
    if r.rank != 0:
        return None
    return {"plans": plans, "budget": budget, "received": groups, "state": state, "skeleton": sk, "infos": infos,
            "seconds": time.time() - t0}


def load_group(result: dict, p: GroupPlan) -> dict:
    """A finished group's packed state (received from its rank, or from the state folder)."""
    state = result["state"]
    f = _state_file(state, "group", p.index)
    if p.index in result["received"]:
        obj = _group_from_tensors(result["received"].pop(p.index), p)
        _save(obj, f)  # rank 0 keeps every group: a resumed run finds them
        return obj
    return _load(f, p)


def checkpoint_parts(result: dict) -> tuple[dict, dict, dict]:
    """(tensors, structure, counts) of the compressed model for fips_rt.checkpoint, from the packed
    groups and the unchanged tensors of the safetensors (read one block at a time)."""
    sk: Skeleton = result["skeleton"]
    plans: list[GroupPlan] = result["plans"]
    tensors: dict[str, torch.Tensor] = {}
    fips = []
    replaced = set()
    groups_out = []
    mlp_dense = mlp_params = mlp_bytes = 0
    for p in plans:
        obj = load_group(result, p)
        key = f"basis.{p.index}"
        tensors[key] = obj["U"].contiguous()
        g = {"rank": p.rank, "linears": len(p.linears), "u_params": obj["U"].numel(), "v_nnz": 0, "v_entries": 0,
             "mask_bytes": 0, "dense_params": 0}
        mlp_params += obj["U"].numel()
        mlp_bytes += obj["U"].numel() * 4
        for j, (path, orient) in enumerate(p.linears):
            vals, msk, b = obj["values"][j], obj["masks"][j], obj["bias"][j]
            tensors[f"{path}.values"] = vals
            tensors[f"{path}.mask"] = msk
            if b is not None:
                tensors[f"{path}.bias"] = b
            nnz = int(vals.numel())
            fips.append({"path": path, "orientation": orient, "basis": key, "shape": [p.rank, p.d_ff], "nnz": nnz,
                         "bias": b is not None})
            replaced.add(path)
            nb = 0 if b is None else b.numel()
            mlp_dense += p.d * p.d_ff + nb
            mlp_params += nnz + nb
            mlp_bytes += nnz * 4 + int(msk.numel()) + nb * 4
            g["v_nnz"] += nnz
            g["v_entries"] += p.rank * p.d_ff
            g["mask_bytes"] += int(msk.numel())
            g["dense_params"] += p.d * p.d_ff
        g["density"] = g["v_nnz"] / max(1, g["v_entries"])
        g["params"] = g["u_params"] + g["v_nnz"]
        g["bytes"] = (g["u_params"] + g["v_nnz"]) * 4 + g["mask_bytes"]
        groups_out.append(g)
        del obj
    # unchanged tensors: names in state_dict order; tied tensors recorded once (aliases)
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    to_read = []
    other = 0
    for name, t in sk.model.state_dict(keep_vars=True).items():
        if any(name.startswith(pth + ".") for pth in replaced):
            continue
        if t.numel() > 0 and id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        if isinstance(t, nn.Parameter):
            other += t.numel()
        if t.is_meta:
            to_read.append(name)
        else:
            tensors[name] = t.detach().cpu().contiguous()
    for i in range(0, len(to_read), 64):
        tensors.update(sk.weights.read(to_read[i:i + 64]))
    structure = {"fips_linears": fips, "delta_linears": [], "aliases": aliases}
    params_dense, params = other + mlp_dense, other + mlp_params
    counts = {"mlp_params_dense": mlp_dense, "mlp_params": mlp_params, "params_dense": params_dense, "params": params,
              "mlp_bytes_dense": mlp_dense * 4, "mlp_bytes": mlp_bytes, "bytes_dense": params_dense * 4,
              "bytes": other * 4 + mlp_bytes, "mlp_ratio": mlp_params / mlp_dense, "params_ratio": params / params_dense,
              "bytes_ratio": (other * 4 + mlp_bytes) / (params_dense * 4), "groups": groups_out}
    return tensors, structure, counts
