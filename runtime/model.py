"""Exported models in onnxruntime, one class per model kind.

:meth:`Model.load` opens a model folder (``model.onnx`` + tokenizer files + ``fips_config.json``) or an
``.onnx`` file and returns a :class:`CausalLM` (text generation with a KV cache), an :class:`Encoder`
(sentence embeddings) or an :class:`ImageClassifier`. The kind and the cache layout come from the
session's own inputs and outputs, checked against the export contract (``fips_rt.runtime.contract``).
Torch-free and transformers-free.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import contract as C
from .sampling import check_sampling, sample_next_token
from .session import FipsRuntimeError, SessionInfo, create_session, ort, resolve_model_path
from .streaming import GenerationChunk, GenerationResult, TextStream
from .tokenizer import Tokenizer

__all__ = ["Model", "CausalLM", "Encoder", "ImageClassifier", "KVCache", "BatchKVCache", "KIND_NAMES"]

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                 "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")


def _np_type(ort_type: str, what: str):
    try:
        return _ORT_TO_NUMPY[ort_type]
    except KeyError:
        raise FipsRuntimeError(f"unsupported element type {ort_type} for {what}") from None


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, int) and dim >= 0 else None


class KVCache:
    """Past keys/values of one sequence (onnxruntime values, fed back without copies) and its length."""

    __slots__ = ("values", "length")

    def __init__(self, values: list, length: int):
        self.values = values
        self.length = length


class _KVStore:
    """The memory behind a :class:`BatchKVCache` made by :meth:`CausalLM.stack_caches`: two sets of flat
    buffers per past input, used in turn. A decoding step reads its past from one set and onnxruntime writes
    the ``present`` outputs straight into the other (IOBinding), so that a row joins the batch by being
    written behind the last row and a finished row leaves by moving the last row into its place, without
    copying the others. ``max_rows`` rows fit without reallocating; columns grow ``COL_SLACK`` at a time."""

    COL_SLACK = 32

    def __init__(self, specs: list, max_rows: int):
        self.dims = [(heads, head_dim) for (_, heads, _, head_dim), _ in specs]
        self.dtypes = [np.dtype(dt) for _, dt in specs]
        self.max_rows = max(1, int(max_rows))
        self.flat = [[np.empty(0, dt) for dt in self.dtypes] for _ in range(2)]

    def fits(self, s: int, rows: int, width: int) -> bool:
        return all(f.size >= rows * h * width * d for f, (h, d) in zip(self.flat[s], self.dims))

    def reserve(self, s: int, rows: int, width: int) -> None:
        """Room for ``rows`` x ``width`` in set ``s`` (what it held is lost when it grows)."""
        for j, ((h, d), dt) in enumerate(zip(self.dims, self.dtypes)):
            if self.flat[s][j].size < rows * h * width * d:
                self.flat[s][j] = np.empty(max(rows, self.max_rows) * h * (width + self.COL_SLACK) * d, dt)

    def views(self, s: int, rows: int, width: int) -> list[np.ndarray]:
        return [f[:rows * h * width * d].reshape(rows, h, width, d) for f, (h, d) in zip(self.flat[s], self.dims)]


class BatchKVCache:
    """Past keys/values of several sequences stacked on the batch axis (``[batch, kv_heads, width,
    head_dim]`` per past input), each row **left-padded**: row ``b`` holds its ``lengths[b]`` positions in
    the last ``lengths[b]`` columns, the columns before them are zeros that the attention mask hides.
    ``values`` are onnxruntime values or C-contiguous numpy arrays, fed back without copies. A batch made by
    :meth:`CausalLM.stack_caches` lives in a ``_KVStore`` (set ``slot`` of it); passing it to
    :meth:`CausalLM.decode_batch` hands its memory back: the step after the next one overwrites it."""

    __slots__ = ("values", "lengths", "store", "slot")

    def __init__(self, values: list, lengths: Sequence[int], store: _KVStore | None = None, slot: int = 0):
        self.values = values
        self.lengths = [int(x) for x in lengths]
        self.store = store
        self.slot = slot

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns per row: the longest row's length (plus any padding left in front of it)."""
        if not self.values:
            return max(self.lengths, default=0)
        v = self.values[0]
        return int((v.shape() if isinstance(v, ort.OrtValue) else v.shape)[2])

    def row(self, b: int) -> KVCache:
        """Row ``b`` as a one-sequence :class:`KVCache` (numpy views, no copy)."""
        n, w = self.lengths[b], self.width
        return KVCache([_as_numpy(v)[b:b + 1, :, w - n:, :] for v in self.values], n)


def _as_numpy(v) -> np.ndarray:
    return v.numpy() if isinstance(v, ort.OrtValue) else np.asarray(v)  # OrtValue.numpy() shares the memory


def _write_row(values: list[np.ndarray], b: int, cache: KVCache, width: int) -> None:
    """Row ``b`` of ``values`` = ``cache`` left-padded with zeros to ``width`` columns."""
    n = cache.length
    for out, v in zip(values, cache.values):
        out[b, :, :width - n, :] = 0
        if n:
            out[b, :, width - n:, :] = _as_numpy(v)[0, :, -n:, :]


def _drop_rows(batch: BatchKVCache, keep: list[int]) -> tuple[BatchKVCache, list[int]]:
    """Rows ``keep`` of ``batch``, in place: the slot of each dropped row is taken by the last kept row.
    Returns the smaller batch (views of the same memory) and, per row, its index in ``batch``."""
    order = list(range(batch.batch_size))
    kept = set(keep)
    for hole in sorted(set(order) - kept):
        while order and order[-1] not in kept:
            order.pop()
        if hole >= len(order):
            break
        for v in batch.values:
            v[hole] = v[len(order) - 1]
        order[hole] = order.pop()
    rows = len(order)
    values = [v[:rows] for v in batch.values]
    return BatchKVCache(values, [batch.lengths[i] for i in order], batch.store, batch.slot), order


KIND_NAMES = {C.CAUSAL_LM: "causal language model", C.ENCODER: "sentence encoder", C.VIT: "image classifier"}


def _contract_for(model_dir: Path, onnx_path: Path) -> "C.ExportContract | None":
    """The folder's contract if it describes this very file (one export per folder); strict, so a
    malformed ``fips_config.json`` is one ``FipsRuntimeError`` line."""
    try:
        contract = C.read_contract(model_dir)
    except C.ContractError as e:
        raise FipsRuntimeError(f"{Path(model_dir) / C.CONFIG_FILE}: {str(e).removeprefix(C.CONFIG_FILE + ': ')}") from None
    if contract is not None and contract.model_file != Path(onnx_path).name:
        return None  # it describes another export in the same folder
    return contract


def _graph_kind(inputs: set[str], outputs: set[str]) -> str | None:
    """The model kind a graph's input and output names say (None: none of ours)."""
    if "input_ids" in inputs and "logits" in outputs:
        return C.CAUSAL_LM
    if "pixel_values" in inputs:
        return C.VIT
    if "input_ids" in inputs:
        return C.ENCODER
    return None


def _needs(kind: str, what: str):
    def method(self, *args, **kwargs):
        self._require(kind, what)
    method.__doc__ = f"{what}: only a {kind} model has it."
    return method


class Model:
    """An exported model opened in onnxruntime. Create with :meth:`Model.load`, which returns the class of
    the model's kind: :class:`CausalLM`, :class:`Encoder` or :class:`ImageClassifier`. What one kind
    cannot do (``embed`` on a causal LM, ...) is a clear :class:`FipsRuntimeError`."""

    kind_handled: str | None = None
    has_kv_cache = False
    max_positions: int | None = None

    DEFAULT_PREFILL_CHUNK = 512

    def __init__(self, session: "ort.InferenceSession", info: SessionInfo, *, name: str | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, contract: "C.ExportContract | None | bool" = True):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise FipsRuntimeError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.session = session
        self.info = info
        self.model_dir = Path(info.model_dir)
        self.onnx_path = Path(info.onnx_path)
        # the export contract (fips_config.json, read strictly); None for an ONNX file made elsewhere
        self.contract = _contract_for(self.model_dir, self.onnx_path) if contract is True else contract or None
        self.name = name or self._default_name()
        self._inputs = {i.name: i for i in session.get_inputs()}
        self._outputs = {o.name: o for o in session.get_outputs()}
        self.input_names = list(self._inputs)
        self.output_names = list(self._outputs)
        self.kind = self._detect_kind()
        self._tokenizer: Tokenizer | None = None
        self._tok_lock = threading.Lock()
        if type(self).kind_handled != self.kind:
            raise FipsRuntimeError(f"{type(self).__name__} opens {type(self).kind_handled} models; "
                                   f"{self.onnx_path.name} is a {self.kind} model (use Model.load)")
        self._setup()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, *, threads: int | None = None, kernel: str = "auto", provider: str = "auto",
             spinning: bool | None = None, name: str | None = None,
             prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, **session_kwargs) -> "Model":
        """Open a model folder (``model.onnx`` + tokenizer files + ``fips_config.json``) or an ``.onnx`` file.

        ``kernel`` ("auto" | "native" | "reference") is passed to ``fips_rt.runtime.native.register``;
        ``provider`` is "auto" (CUDA when available, CPU otherwise), "cpu" or "cuda"; ``threads`` the
        intra-op threads (default: usable cores); ``spinning`` None = on (onnxruntime's default).
        ``prefill_chunk``: prompts longer than this are run through the KV cache in chunks of this many
        tokens (bounds the attention's activation memory; None = the whole prompt at once).
        Other keyword arguments go to :func:`fips_rt.runtime.session.create_session`.
        """
        onnx_path, model_dir = resolve_model_path(path)
        contract = _contract_for(model_dir, onnx_path)  # a bad fips_config.json is refused before any session
        sess, info = create_session(path, threads=threads, kernel=kernel, provider=provider, spinning=spinning,
                                    **session_kwargs)
        kind = _graph_kind({i.name for i in sess.get_inputs()}, {o.name for o in sess.get_outputs()})
        impl = _KIND_CLASSES.get(kind, cls) if cls is Model else cls
        return impl(sess, info, name=name, prefill_chunk=prefill_chunk, contract=contract)

    def _default_name(self) -> str:
        if self.contract is not None and self.contract.name:
            return self.contract.name
        if self.onnx_path.stem in ("model", "decoder_model", "decoder_model_merged"):
            return self.model_dir.resolve().name
        return self.onnx_path.stem

    def _detect_kind(self) -> str:
        ins, outs = self._inputs, self._outputs
        kind = _graph_kind(set(ins), set(outs))
        if self.contract is not None and self.contract.kind != kind:
            raise FipsRuntimeError(f"{C.CONFIG_FILE} says {self.onnx_path.name} is a {self.contract.kind} model, but "
                                   f"its graph has inputs {list(ins)} and outputs {list(outs)}")
        if kind is None:
            raise FipsRuntimeError(f"cannot tell what kind of model {self.onnx_path} is; inputs {list(ins)}, "
                                   f"outputs {list(outs)}")
        return kind

    @property
    def tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            with self._tok_lock:
                if self._tokenizer is None:
                    lm = self.contract.causal_lm if self.contract is not None else None
                    self._tokenizer = Tokenizer(self.model_dir, eos_token_ids=lm.eos_token_ids if lm else ())
        return self._tokenizer

    def describe(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "onnx": str(self.onnx_path), "session": self.info.to_dict()}
        if self.kind == "causal-lm":
            d.update(layers=self.num_layers, kv_cache=self.has_kv_cache, max_positions=self.max_positions,
                     vocab_size=self.vocab_size)
        return d

    def _setup(self) -> None:
        raise NotImplementedError

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise FipsRuntimeError(f"{what} needs a {KIND_NAMES[kind]}; {self.name} is a {KIND_NAMES[self.kind]}")

    # what the other kinds do: a clear error here, the real method in their class
    forward = _needs(C.CAUSAL_LM, "forward()")
    prefill = _needs(C.CAUSAL_LM, "prefill()")
    new_cache = _needs(C.CAUSAL_LM, "a KV cache")
    full_logits = _needs(C.CAUSAL_LM, "logits")
    sequence_logits = _needs(C.CAUSAL_LM, "logits")
    encode_prompt = _needs(C.CAUSAL_LM, "a prompt")
    stream = _needs(C.CAUSAL_LM, "text generation")
    generate = _needs(C.CAUSAL_LM, "text generation")
    render_chat = _needs(C.CAUSAL_LM, "a chat")
    chat = _needs(C.CAUSAL_LM, "a chat")
    chat_stream = _needs(C.CAUSAL_LM, "a chat")
    embed = _needs(C.ENCODER, "embed()")
    classify = _needs(C.VIT, "classify()")
    classify_logits = _needs(C.VIT, "classify()")


class CausalLM(Model):
    """A causal language model: prefill, KV-cache decoding, sampling, streaming, chat."""

    kind_handled = C.CAUSAL_LM

    def _setup(self) -> None:
        ins, outs = self._inputs, self._outputs
        past: dict[int, dict[str, Any]] = {}
        for n, i in ins.items():
            m = _PAST_RE.match(n)
            if m:
                past.setdefault(int(m.group(1)), {})[m.group(2)] = i
        present = {}
        for n in outs:
            m = _PRESENT_RE.match(n)
            if m:
                present[(int(m.group(1)), m.group(2))] = n
        self.num_layers = len(past)
        self.has_kv_cache = bool(past)
        self._past_names: list[str] = []
        self._present_names: list[str] = []
        self._past_specs: list[tuple[tuple[int, int, int, int], Any]] = []
        spec = self.contract.causal_lm if self.contract is not None else None
        if spec is not None and sorted(past) != list(range(spec.num_layers)):
            raise FipsRuntimeError(f"{self.onnx_path.name} has KV-cache inputs for {len(past)} layers; "
                                   f"{C.CONFIG_FILE} says num_layers = {spec.num_layers}")
        for layer in sorted(past):
            for kv in ("key", "value"):
                if kv not in past[layer] or (layer, kv) not in present:
                    raise FipsRuntimeError(f"past_key_values.{layer}.{kv} has no matching present.{layer}.{kv} "
                                           f"output in {self.onnx_path}")
                i = past[layer][kv]
                shape = list(i.shape)
                if len(shape) != 4:
                    raise FipsRuntimeError(f"{i.name}: expected [batch, kv_heads, past_seq, head_dim], got {shape}")
                heads = _static(shape[1]) or (spec.num_kv_heads if spec else None)
                head_dim = _static(shape[3]) or (spec.head_dim if spec else None)
                if spec is not None and (heads, head_dim) != (spec.num_kv_heads, spec.head_dim):
                    raise FipsRuntimeError(f"{i.name} has shape {shape}; {C.CONFIG_FILE} says num_kv_heads = "
                                           f"{spec.num_kv_heads}, head_dim = {spec.head_dim}")
                if not heads or not head_dim:
                    raise FipsRuntimeError(f"{i.name}: cannot determine kv heads / head_dim (shape {shape})")
                self._past_names.append(i.name)
                self._present_names.append(present[(layer, kv)])
                self._past_specs.append(((1, heads, 0, head_dim), _np_type(i.type, i.name)))
        self._ids_dtype = _np_type(ins["input_ids"].type, "input_ids")
        self._mask_dtype = _np_type(ins["attention_mask"].type, "attention_mask") if "attention_mask" in ins else None
        self._pos_dtype = _np_type(ins["position_ids"].type, "position_ids") if "position_ids" in ins else None
        known = {"input_ids", "attention_mask", "position_ids", *self._past_names}
        extra = [n for n in ins if n not in known]
        if extra:
            raise FipsRuntimeError(f"unexpected inputs for a causal LM: {extra}")
        lshape = list(outs["logits"].shape)
        self.vocab_size = _static(lshape[-1]) if lshape else None
        if self.vocab_size is None and spec is not None:
            self.vocab_size = spec.vocab_size
        self.last_logits_only = len(lshape) == 3 and lshape[1] == 1
        mp = spec.max_position_embeddings if spec is not None else None
        self.max_positions = mp if mp and mp > 0 else None
        self._run_outputs = ["logits", *self._present_names]

    def new_cache(self) -> KVCache:
        """An empty KV cache (past length 0)."""
        self._require("causal-lm", "a KV cache")
        return KVCache([np.zeros(shape, dtype=dt) for shape, dt in self._past_specs], 0)

    def forward(self, ids: Sequence[int], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache | None]:
        """Run ``ids`` after ``cache`` (None: from scratch). Returns the last position's logits (float32
        ``[vocab]``) and the extended cache (None for a model exported without KV cache)."""
        logits, new_cache = self._run(ids, cache)
        return np.asarray(logits[0, -1], dtype=np.float32), new_cache

    def sequence_logits(self, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
        """Logits of every position ``[len(ids), vocab]`` (float32) of one sequence run from scratch: what
        perplexity needs. ``chunk``: run the sequence through the KV cache ``chunk`` tokens per call (the
        shapes decoding and batched serving run, e.g. 1 or 16), instead of in one call. Refused for an
        export made with ``--last-logits-only``."""
        if getattr(self, "last_logits_only", False):
            raise FipsRuntimeError(f"{self.name} was exported with --last-logits-only: it returns the last "
                                   f"position's logits only, so perplexity cannot be computed from it")
        if chunk is None or chunk >= len(ids):
            logits, _ = self._run(ids, None)
            return np.asarray(logits[0], dtype=np.float32)
        if not self.has_kv_cache:
            raise FipsRuntimeError(f"{self.name} has no KV cache: it cannot be scored in chunks")
        parts, cache = [], None
        for s in range(0, len(ids), max(1, int(chunk))):
            logits, cache = self._run(ids[s:s + chunk], cache)
            parts.append(np.asarray(logits[0], dtype=np.float32))
        return np.concatenate(parts)

    def _run(self, ids: Sequence[int], cache: KVCache | None) -> tuple[np.ndarray, KVCache | None]:
        self._require("causal-lm", "forward()")
        ids = np.asarray(ids, dtype=self._ids_dtype).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise FipsRuntimeError("forward() needs at least one token")
        if cache is None and self.has_kv_cache:
            cache = self.new_cache()
        past_len = cache.length if cache is not None else 0
        feeds: dict[str, Any] = {"input_ids": ids}
        if self._mask_dtype is not None:
            feeds["attention_mask"] = np.ones((1, past_len + n), dtype=self._mask_dtype)
        if self._pos_dtype is not None:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=self._pos_dtype).reshape(1, n)
        ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        if cache is not None:
            for name, v in zip(self._past_names, cache.values):
                ort_feeds[name] = v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
        outs = self.session.run_with_ort_values(self._run_outputs, ort_feeds)
        new_cache = KVCache(list(outs[1:]), past_len + n) if cache is not None else None
        return outs[0].numpy(), new_cache

    def prefill(self, ids: Sequence[int], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache | None]:
        """Run a prompt, in chunks of ``prefill_chunk`` tokens through the KV cache when it is longer.
        Returns the last position's logits and the cache (None for a model without KV cache)."""
        ids = list(ids)
        if not self.has_kv_cache:
            return self.full_logits(ids), None
        step = self.prefill_chunk or len(ids)
        logits = None
        for s in range(0, len(ids), max(1, step)):
            logits, cache = self.forward(ids[s:s + step], cache)
        if logits is None:
            raise FipsRuntimeError("prefill() needs at least one token")
        return logits, cache

    def full_logits(self, ids: Sequence[int]) -> np.ndarray:
        """No-cache forward over the whole sequence; last position's logits (a reference for tests)."""
        return self.forward(ids, None)[0]

    # ------------------------------------------------------------------ batched decoding (fips serve)
    @property
    def supports_batching(self) -> bool:
        """Whether :meth:`decode_batch` can run: a KV cache plus ``attention_mask`` and ``position_ids``
        inputs (per-row masks hide the left padding, per-row positions keep each sequence's own)."""
        return self.has_kv_cache and self._mask_dtype is not None and self._pos_dtype is not None

    def stack_caches(self, caches: Sequence[KVCache], *, max_rows: int | None = None) -> BatchKVCache:
        """Stack one-sequence caches (e.g. :meth:`BatchKVCache.row` views of an older batch) into a new
        left-padded :class:`BatchKVCache` as wide as the longest of them (one copy of every cache).
        ``max_rows``: rows the batch may grow to without reallocating (:meth:`update_batch`)."""
        self._require("causal-lm", "a KV cache")
        if not self.has_kv_cache:
            raise FipsRuntimeError(f"{self.name} was exported without a KV cache; it cannot decode in batches")
        caches = list(caches)
        store = _KVStore(self._past_specs, max(max_rows or 0, len(caches)))
        return self._fill(store, 0, caches)

    def _fill(self, store: _KVStore, slot: int, caches: list[KVCache]) -> BatchKVCache:
        """Write ``caches`` left-padded into set ``slot`` of ``store`` (which must not hold any of them)."""
        lengths = [c.length for c in caches]
        width = max(lengths, default=0)
        store.reserve(slot, len(caches), width)
        values = store.views(slot, len(caches), width)
        for b, c in enumerate(caches):
            _write_row(values, b, c, width)
        return BatchKVCache(values, lengths, store, slot)

    def update_batch(self, batch: BatchKVCache | None, keep: Sequence[int], join: Sequence[KVCache], *,
                     max_rows: int | None = None) -> tuple[BatchKVCache | None, list[int]]:
        """The batch of rows ``keep`` of ``batch`` followed by the caches ``join``, mostly in place: a
        finished row's slot is taken by the last row, a joining cache is written behind the last row; a
        full restack (one copy of every row) happens only when a joining cache is longer than the batch
        is wide, there is no room, or a quarter of the columns (at least ``COL_SLACK``) became padding.
        Returns the new batch (None when empty) and, per row, where it came from: ``i < batch_size`` is
        row ``i`` of ``batch``, ``batch_size + k`` is ``join[k]``. ``max_rows``: as in :meth:`stack_caches`."""
        old_rows = batch.batch_size if batch is not None else 0
        join = list(join)
        if batch is not None and batch.store is not None and keep:
            batch, order = _drop_rows(batch, list(keep))
        else:
            rows = [batch.row(i) for i in keep] if batch is not None else []
            batch, order = (self.stack_caches(rows, max_rows=max_rows) if rows else None), list(keep)
        order += [old_rows + k for k in range(len(join))]
        if not join:
            return batch, order
        if batch is None:
            return self.stack_caches(join, max_rows=max_rows), order
        rows, width, store = batch.batch_size, batch.width, batch.store
        longest = max(batch.lengths + [c.length for c in join])
        if (longest > width or width - longest >= max(store.COL_SLACK, width // 4)
                or not store.fits(batch.slot, rows + len(join), width)):
            caches = [batch.row(i) for i in range(rows)] + join
            return self._fill(store, 1 - batch.slot, caches), order
        values = store.views(batch.slot, rows + len(join), width)
        for k, c in enumerate(join):
            _write_row(values, rows + k, c, width)
        return BatchKVCache(values, batch.lengths + [c.length for c in join], store, batch.slot), order

    def decode_batch(self, cache: "BatchKVCache | Sequence[KVCache]", tokens: Sequence[int]
                     ) -> tuple[np.ndarray, BatchKVCache]:
        """One decoding step of several sequences in ONE session call: ``tokens[b]`` follows row ``b`` of
        ``cache`` (a :class:`BatchKVCache`, or a list of :class:`KVCache` stacked first). Row ``b`` gets
        ``position_ids = lengths[b]`` and an attention mask that is 0 over its left padding, so its logits
        are those :meth:`forward` gives for that sequence alone. Returns float32 logits ``[batch, vocab]``
        and the cache one column wider: onnxruntime writes the ``present`` outputs into the other buffer
        set of the batch's store (IOBinding, no copy afterwards), so ``cache``'s memory is reused by the
        step after this one -- keep only the batch returned."""
        self._require("causal-lm", "forward()")
        if not self.supports_batching:
            raise FipsRuntimeError(f"{self.name}: batched decoding needs a KV cache and attention_mask and "
                                   f"position_ids inputs; the graph has {self.input_names}")
        if not isinstance(cache, BatchKVCache):
            cache = self.stack_caches(cache)
        b = cache.batch_size
        if len(tokens) != b or b == 0:
            raise FipsRuntimeError(f"decode_batch: {len(tokens)} tokens for a batch of {b} sequences")
        width = cache.width
        lengths = np.asarray(cache.lengths, dtype=np.int64)
        if lengths.min() < 0 or lengths.max() > width:
            raise FipsRuntimeError(f"decode_batch: row lengths {cache.lengths} do not fit a cache {width} wide")
        feeds: dict[str, Any] = {
            "input_ids": np.asarray(tokens, dtype=self._ids_dtype).reshape(b, 1),
            "attention_mask": (np.arange(width + 1)[None, :] >= (width - lengths)[:, None]).astype(self._mask_dtype),
            "position_ids": lengths.astype(self._pos_dtype).reshape(b, 1),
        }
        if cache.store is None:  # a batch made elsewhere: copied once into a store
            cache = self._fill(_KVStore(self._past_specs, b), 0, [cache.row(i) for i in range(b)])
        store, slot = cache.store, 1 - cache.slot
        store.reserve(slot, b, width + 1)
        present = store.views(slot, b, width + 1)
        io = self.session.io_binding()
        for name, v in feeds.items():
            io.bind_cpu_input(name, v)
        for name, v in zip(self._past_names, cache.values):
            io.bind_input(name, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
        io.bind_output("logits", "cpu")
        for name, v in zip(self._present_names, present):  # onnxruntime writes the new cache in place
            io.bind_output(name, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
        self.session.run_with_iobinding(io)
        logits = np.asarray(io.get_outputs()[0].numpy()[:, -1], dtype=np.float32)
        return logits, BatchKVCache(present, (lengths + 1).tolist(), store, slot)

    def encode_prompt(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        ids = [int(i) for i in prompt]
        if self.vocab_size:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise FipsRuntimeError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = (),
               stop_token_ids: Iterable[int] = (), ignore_eos: bool = False, add_special_tokens: bool = True,
               _result: GenerationResult | None = None) -> Iterator[GenerationChunk]:
        """Generate token by token, yielding :class:`GenerationChunk` s (the last one has ``finish_reason``).

        Greedy when ``temperature == 0``; otherwise temperature / top-k / top-p sampling from a generator
        seeded with ``seed`` (same seed, same prompt, same options -> same tokens). Generation stops at
        the tokenizer's/config's eos ids (unless ``ignore_eos``), at ``stop_token_ids``, at any of the
        ``stop`` strings (excluded from the text) or after ``max_new_tokens``.
        """
        self._require("causal-lm", "text generation")
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if isinstance(s, str) and s]
        prompt_ids = self.encode_prompt(prompt, add_special_tokens=add_special_tokens)
        if not prompt_ids:
            raise FipsRuntimeError("the prompt is empty (no tokens)")
        if self.max_positions:
            if len(prompt_ids) >= self.max_positions:
                raise FipsRuntimeError(f"the prompt has {len(prompt_ids)} tokens; this model handles at most "
                                       f"{self.max_positions} positions")
            max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt_ids))
        stops: set[int] = {int(t) for t in stop_token_ids}
        if not ignore_eos:
            stops |= set(self.tokenizer.eos_token_ids) if self._has_tokenizer() else set()
        rng = np.random.default_rng(seed)
        text = TextStream(self.tokenizer, prompt_ids, stop) if self._has_tokenizer() else None
        result = _result
        if result is not None:
            result.prompt_token_ids = list(prompt_ids)
        generated: list[int] = []
        finish = "length"
        if max_new_tokens <= 0:
            yield GenerationChunk("", [], finish)
            return
        t0 = time.perf_counter()
        logits, cache = self.prefill(prompt_ids)
        t1 = time.perf_counter()
        if result is not None:
            result.prefill_s = t1 - t0
        while True:
            tok = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
            if tok in stops:
                finish = "stop"
                break
            generated.append(tok)
            delta = text.push(tok) if text is not None else ""
            stopped = text is not None and text.stopped
            if stopped:
                finish = "stop"
            if result is not None:
                result.token_ids = generated
            yield GenerationChunk(delta, [tok], None)
            if stopped or len(generated) >= max_new_tokens:
                break
            if cache is not None:
                logits, cache = self.forward([tok], cache)
            else:
                logits = self.full_logits(prompt_ids + generated)
        if result is not None:
            result.token_ids = list(generated)
            result.decode_s = time.perf_counter() - t1
            result.finish_reason = finish
        yield GenerationChunk(text.flush() if text is not None else "", [], finish)

    def _has_tokenizer(self) -> bool:
        try:
            self.tokenizer
            return True
        except FipsRuntimeError:
            return False

    def generate(self, prompt: str | Sequence[int], *, callback: Callable[[GenerationChunk], Any] | None = None,
                 **options) -> GenerationResult:
        """Generate a completion (see :meth:`stream` for the options). ``callback`` gets every chunk."""
        result = GenerationResult(text="", token_ids=[], prompt_token_ids=[], finish_reason="length")
        parts = []
        for chunk in self.stream(prompt, _result=result, **options):
            parts.append(chunk.text)
            if callback is not None:
                callback(chunk)
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
        result.text = "".join(parts)
        return result

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **variables) -> str:
        """The chat template applied to ``messages`` (a list of ``{"role", "content"}``)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  **variables)

    def chat(self, messages: Sequence[dict], *, callback=None, **options) -> GenerationResult:
        """Render the chat template and generate the assistant's reply."""
        prompt = self.render_chat(messages)
        return self.generate(prompt, callback=callback, add_special_tokens=False, **options)

    def chat_stream(self, messages: Sequence[dict], **options) -> Iterator[GenerationChunk]:
        return self.stream(self.render_chat(messages), add_special_tokens=False, **options)


class Encoder(Model):
    """A sentence encoder: pooled (or mean-pooled) embeddings."""

    kind_handled = C.ENCODER

    def _setup(self) -> None:
        ins, outs = self._inputs, self._outputs
        self._enc_inputs = {n: _np_type(i.type, n) for n, i in ins.items()}
        unknown = [n for n in ins if n not in ("input_ids", "attention_mask", "token_type_ids")]
        if unknown:
            raise FipsRuntimeError(f"unexpected encoder inputs: {unknown}")
        pooled = [o for o in outs.values() if o.name != "last_hidden_state" and len(o.shape) == 2]
        pooled.sort(key=lambda o: (0 if "sentence" in o.name else 1 if "embed" in o.name else 2, o.name))
        self._pooled_output = pooled[0].name if pooled else None
        if self._pooled_output is None and "last_hidden_state" not in outs:
            raise FipsRuntimeError(f"encoder without last_hidden_state or a pooled output: {list(outs)}")
        enc = self.contract.encoder if self.contract is not None else None
        mp = enc.max_position_embeddings if enc is not None else None
        self.max_positions = mp if mp and mp > 0 else None
        self.has_kv_cache = False

    def max_input_tokens(self) -> int | None:
        limits = [x for x in (self.max_positions, self.tokenizer.model_max_length) if x]
        return min(limits) if limits else None

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 32,
              truncate: bool = True) -> np.ndarray:
        """Sentence embeddings ``[n, dim]`` (float32): the model's pooled output when it exports one,
        otherwise the attention-masked mean of ``last_hidden_state``; L2-normalized unless ``normalize=False``."""
        self._require("encoder", "embed()")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise FipsRuntimeError("embed() needs at least one text")
        limit = self.max_input_tokens()
        out = []
        for s in range(0, len(texts), batch_size):
            encs = self.tokenizer.encode_batch(texts[s:s + batch_size])
            ids = [list(e.ids) for e in encs]
            if limit:
                for j, x in enumerate(ids):
                    if len(x) > limit:
                        if not truncate:
                            raise FipsRuntimeError(f"text {s + j} has {len(x)} tokens; the model takes {limit}")
                        ids[j] = x[:limit]
            out.append(self._embed_ids(ids))
        emb = np.concatenate(out, axis=0).astype(np.float32)
        if normalize:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb[0] if single else emb

    def _embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        n = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        arr = np.full((len(ids), n), pad, dtype=np.int64)
        mask = np.zeros((len(ids), n), dtype=np.int64)
        for j, x in enumerate(ids):
            arr[j, :len(x)] = x
            mask[j, :len(x)] = 1
        feeds = {}
        for name, dt in self._enc_inputs.items():
            src = {"input_ids": arr, "attention_mask": mask, "token_type_ids": np.zeros_like(arr)}[name]
            feeds[name] = src.astype(dt)
        if self._pooled_output is not None:
            (pooled,) = self.session.run([self._pooled_output], feeds)
            return np.asarray(pooled, dtype=np.float32)
        (h,) = self.session.run(["last_hidden_state"], feeds)
        m = mask[:, :, None].astype(np.float32)
        return (np.asarray(h, dtype=np.float32) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


class ImageClassifier(Model):
    """An image classifier (timm ViT / DeiT / Swin)."""

    kind_handled = C.VIT

    def _setup(self) -> None:
        i = self._inputs["pixel_values"]
        self._pixel_dtype = _np_type(i.type, "pixel_values")
        self.image_shape = tuple(_static(d) for d in i.shape[1:])
        if any(d is None for d in self.image_shape):
            vis = self.contract.vision if self.contract is not None else None
            if vis is not None:
                self.image_shape = tuple(vis.image_size)
        out = "logits" if "logits" in self._outputs else self.output_names[0]
        self._logits_output = out
        self.labels: dict[int, str] = {}  # the export contract carries no class names (yet)
        self.has_kv_cache = False
        self.max_positions = None

    def classify_logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Raw logits ``[n, classes]`` for preprocessed images ``[n, 3, H, W]`` (or one ``[3, H, W]``)."""
        self._require("vit", "classify()")
        x = np.asarray(pixel_values)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise FipsRuntimeError(f"pixel_values must be [n, C, H, W] or [C, H, W], got shape {x.shape}")
        expect = self.image_shape
        if all(d is not None for d in expect) and tuple(x.shape[1:]) != tuple(expect):
            raise FipsRuntimeError(f"pixel_values of shape {tuple(x.shape[1:])}; the model takes {tuple(expect)}")
        (logits,) = self.session.run([self._logits_output], {"pixel_values": x.astype(self._pixel_dtype)})
        return np.asarray(logits, dtype=np.float32)

    def classify(self, pixel_values: np.ndarray, *, top_k: int = 5) -> list[list[dict]]:
        """Top-k predictions per image: ``[[{"index", "label", "score"}, ...], ...]`` (softmax scores)."""
        logits = self.classify_logits(pixel_values)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        k = max(1, min(int(top_k), p.shape[1]))
        out = []
        for row in p:
            idx = np.argsort(-row, kind="stable")[:k]
            out.append([{"index": int(j), "label": self.labels.get(int(j), str(int(j))), "score": float(row[j])}
                        for j in idx])
        return out


_KIND_CLASSES: dict[str, type[Model]] = {C.CAUSAL_LM: CausalLM, C.ENCODER: Encoder, C.VIT: ImageClassifier}
