"""Inference with exported fips-rt models: text generation (KV cache), embeddings and image classification.

Torch-free and transformers-free (numpy, onnxruntime, tokenizers, jinja2). Everything is derived from
the ONNX session's own input/output names and shapes, completed by ``fips_config.json`` and the tokenizer
files beside the model, all read defensively.

    from fips_rt.runtime import Model
    m = Model.load("runs/smollm2-fips/")            # folder with model.onnx + tokenizer files
    print(m.generate("The capital of France is", max_new_tokens=20).text)
    for chunk in m.stream("Once upon a time", max_new_tokens=50, temperature=0.8, seed=1):
        print(chunk.text, end="", flush=True)
    m.chat([{"role": "user", "content": "Hi!"}]).text

Model kinds (``Model.kind``): ``causal_lm`` (inputs ``input_ids``/``attention_mask``/``position_ids``/
``past_key_values.N.key|value`` -> ``logits``/``present.N.key|value``), ``encoder`` (-> ``last_hidden_state``
and an optional pooled embedding) and ``image_classifier`` (``pixel_values`` -> ``logits``).
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .session import FipsRuntimeError, SessionInfo, create_session, ort, read_json

__all__ = ["Model", "Tokenizer", "ChatTemplate", "GenerationChunk", "GenerationResult", "load", "generate",
           "embed", "classify", "sample_next_token", "FipsRuntimeError"]


# ============================================================================ tokenizer
def _token_content(tok: Any) -> str | None:
    """A special token as written by transformers: a string or an AddedToken dict."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def _read_chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
    if isinstance(tmpl, str) and tmpl.strip():
        return tmpl
    f = model_dir / "chat_template.jinja"
    if f.is_file():
        try:
            text = f.read_text(encoding="utf-8")
            if text.strip():
                return text
        except OSError:
            pass
    data = read_json(model_dir / "chat_template.json")
    if isinstance(data.get("chat_template"), str):
        return data["chat_template"]
    return None


class ChatTemplate:
    """A HF-style chat template compiled once in jinja2's immutable sandbox."""

    def __init__(self, source: str):
        try:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 is part of the runtime extra
            raise FipsRuntimeError("rendering a chat template needs jinja2 (pip install jinja2)") from e

        def raise_exception(message):
            raise FipsRuntimeError(f"chat template error: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        try:
            self._template = env.from_string(source)
        except Exception as e:
            raise FipsRuntimeError(f"invalid chat template: {e}") from e

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **variables) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
        except FipsRuntimeError:
            raise
        except Exception as e:
            raise FipsRuntimeError(f"chat template failed to render: {e}") from e


class Tokenizer:
    """The tokenizer of an exported model folder."""

    def __init__(self, model_dir: str | Path, *, fips_config: dict | None = None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FipsRuntimeError(f"No tokenizer.json in {model_dir}: text generation and embeddings need the "
                                   f"tokenizer files written by the exporter beside the .onnx file.")
        from tokenizers import Tokenizer as _HFTokenizer
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise FipsRuntimeError(f"cannot read {path}: {e}") from e
        # a tokenizer.json may carry padding/truncation settings (saved as a side effect of batch calls);
        # the runtime pads, masks and truncates itself
        self._tok.no_padding()
        self._tok.no_truncation()
        self.model_dir = model_dir
        self.config = read_json(model_dir / "tokenizer_config.json")
        self.special_tokens_map = read_json(model_dir / "special_tokens_map.json")
        fips_config = fips_config or {}

        def special(name: str) -> str | None:
            for src in (self.config, self.special_tokens_map):
                v = _token_content(src.get(name))
                if v:
                    return v
            return None

        self.bos_token = special("bos_token")
        self.eos_token = special("eos_token")
        self.pad_token = special("pad_token")
        self.unk_token = special("unk_token")
        src = _read_chat_template(model_dir, self.config)
        self._chat_template_source = src
        self._chat_template: ChatTemplate | None = None
        # eos ids: tokenizer's eos token + any the model config lists
        eos: set[int] = set()
        if self.eos_token is not None:
            i = self._tok.token_to_id(self.eos_token)
            if i is not None:
                eos.add(int(i))
        for v in _find_values(fips_config, ("eos_token_id", "eos_token_ids")):
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                eos.add(v)
            elif isinstance(v, list):
                eos.update(int(x) for x in v if isinstance(x, int) and not isinstance(x, bool))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        pad = self._tok.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_token_id: int = int(pad) if pad is not None else (min(eos) if eos else 0)
        max_len = self.config.get("model_max_length")
        self.model_max_length = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 1e9 else None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    # -- encoding
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = True):
        return self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # -- chat
    @property
    def chat_template(self) -> str | None:
        return self._chat_template_source

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            **variables) -> str:
        """Render the model's chat template (as transformers does, without tokenizing)."""
        if not self._chat_template_source:
            raise FipsRuntimeError("this model's tokenizer has no chat template (tokenizer_config.json "
                                   "'chat_template' or chat_template.jinja); use a plain completion instead.")
        if self._chat_template is None:
            self._chat_template = ChatTemplate(self._chat_template_source)
        values = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                  "pad_token": self.pad_token or "", "unk_token": self.unk_token or ""}
        values.update(variables)
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **values)


def _find_values(obj: Any, keys: tuple[str, ...], depth: int = 4) -> list[Any]:
    """All values stored under any of ``keys`` in nested dicts (a defensive config lookup)."""
    out: list[Any] = []
    if depth < 0 or not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        if k in keys:
            out.append(v)
        elif isinstance(v, dict):
            out.extend(_find_values(v, keys, depth - 1))
    return out


def find_value(obj: Any, *keys: str, default: Any = None) -> Any:
    """First value under any of ``keys`` (top level first, then nested dicts)."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and obj[k] is not None:
                return obj[k]
    vals = [v for v in _find_values(obj, keys) if v is not None]
    return vals[0] if vals else default


# ============================================================================ sampling
def sample_next_token(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      rng: np.random.Generator | None = None) -> int:
    """Pick the next token from a 1-D logits vector.

    ``temperature <= 0`` (or ``top_k == 1``) is greedy (argmax, first index on ties). Otherwise logits are
    divided by the temperature, restricted to the ``top_k`` largest (0 = all) and to the smallest set whose
    probability reaches ``top_p`` (nucleus; the most likely token is always kept), and one token is drawn
    with ``rng`` (``numpy.random.Generator``; a seeded one makes sampling reproducible).
    """
    logits = np.asarray(logits).reshape(-1)
    if temperature is None or temperature <= 0 or top_k == 1:
        return int(np.argmax(logits))
    if rng is None:
        rng = np.random.default_rng()
    x = logits.astype(np.float64) / float(temperature)
    x[~np.isfinite(x)] = -np.inf
    n = x.shape[0]
    if top_k and 0 < top_k < n:
        idx = np.argpartition(-x, top_k - 1)[:top_k]
    else:
        idx = np.arange(n)
    # order candidates by descending logit (stable: lower id first on ties) so the result is deterministic
    order = idx[np.lexsort((idx, -x[idx]))]
    z = x[order]
    z = z - z[0]
    p = np.exp(z)
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        c = np.cumsum(p)
        keep = int(np.searchsorted(c, float(top_p), side="left")) + 1  # smallest prefix with mass >= top_p
        keep = max(1, min(keep, len(order)))
        order, p = order[:keep], p[:keep]
        p = p / p.sum()
    c = np.cumsum(p)
    u = rng.random() * c[-1]
    j = int(np.searchsorted(c, u, side="right"))
    return int(order[min(j, len(order) - 1)])


# ============================================================================ results
@dataclass
class GenerationChunk:
    """One streamed piece: the new text (may be empty while a stop string or a UTF-8 sequence is
    incomplete), the token ids it came from, and ``finish_reason`` on the last chunk ("stop"/"length")."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str                 # "stop" (eos / stop token / stop string) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens"], d["completion_tokens"] = self.prompt_tokens, self.completion_tokens
        return d


class _TextStream:
    """Incremental detokenization with stop strings.

    Text is decoded from (a few prompt tokens as context +) all generated tokens each step and only the
    part that can no longer change is released: a trailing U+FFFD (an incomplete UTF-8 sequence) and any
    tail that could still grow into a stop string are held back. Streaming and non-streaming use this
    same object, so they produce the same text.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: "Tokenizer", prompt_ids: Sequence[int], stop: Sequence[str]):
        self.tok = tokenizer
        self.context = list(prompt_ids[-self.CONTEXT:])
        self.prefix = tokenizer.decode(self.context) if self.context else ""
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0         # characters of ``text`` already released
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        if self.context:
            full = self.tok.decode(self.context + self.ids)
            if full.startswith(self.prefix):
                return full[len(self.prefix):]
        return self.tok.decode(self.ids)

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly releasable text. Sets ``stopped`` when a stop string appears."""
        self.ids.append(int(token_id))
        text = self._decode()
        self.text = text
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                self.text = text[:end]
                return self._release(end)
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._release(safe)

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """At the end: release everything still held back (up to a found stop string)."""
        return self._release(len(self.text))


# ============================================================================ model
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                 "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
KINDS = ("causal_lm", "encoder", "image_classifier")


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


class Model:
    """An exported model opened in onnxruntime. Create with :meth:`Model.load`."""

    DEFAULT_PREFILL_CHUNK = 512

    def __init__(self, session: "ort.InferenceSession", info: SessionInfo, *, name: str | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise FipsRuntimeError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.session = session
        self.info = info
        self.model_dir = Path(info.model_dir)
        self.onnx_path = Path(info.onnx_path)
        self.fips_config = read_json(self.model_dir / "fips_config.json")
        self.name = name or self._default_name()
        self._inputs = {i.name: i for i in session.get_inputs()}
        self._outputs = {o.name: o for o in session.get_outputs()}
        self.input_names = list(self._inputs)
        self.output_names = list(self._outputs)
        self.kind = self._detect_kind()
        self._tokenizer: Tokenizer | None = None
        self._tok_lock = threading.Lock()
        if self.kind == "causal_lm":
            self._setup_causal_lm()
        elif self.kind == "encoder":
            self._setup_encoder()
        else:
            self._setup_classifier()

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
        sess, info = create_session(path, threads=threads, kernel=kernel, provider=provider, spinning=spinning,
                                    **session_kwargs)
        return cls(sess, info, name=name, prefill_chunk=prefill_chunk)

    def _default_name(self) -> str:
        n = find_value(self.fips_config, "name", "model_name", "model_id")
        if isinstance(n, str) and n:
            return n
        if self.onnx_path.stem in ("model", "decoder_model", "decoder_model_merged"):
            return self.model_dir.resolve().name
        return self.onnx_path.stem

    def _detect_kind(self) -> str:
        task = find_value(self.fips_config, "task", "kind")
        ins, outs = self._inputs, self._outputs
        if "input_ids" in ins and "logits" in outs:
            return "causal_lm"
        if "pixel_values" in ins:
            return "image_classifier"
        if "input_ids" in ins:
            return "encoder"
        raise FipsRuntimeError(f"cannot tell what kind of model {self.onnx_path} is (task={task!r}); inputs "
                               f"{list(ins)}, outputs {list(outs)}")

    @property
    def tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            with self._tok_lock:
                if self._tokenizer is None:
                    self._tokenizer = Tokenizer(self.model_dir, fips_config=self.fips_config)
        return self._tokenizer

    def describe(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "onnx": str(self.onnx_path), "session": self.info.to_dict()}
        if self.kind == "causal_lm":
            d.update(layers=self.num_layers, kv_cache=self.has_kv_cache, max_positions=self.max_positions,
                     vocab_size=self.vocab_size)
        return d

    # ------------------------------------------------------------------ causal LM
    def _setup_causal_lm(self) -> None:
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
        cfg = self.fips_config
        for layer in sorted(past):
            for kv in ("key", "value"):
                if kv not in past[layer] or (layer, kv) not in present:
                    raise FipsRuntimeError(f"past_key_values.{layer}.{kv} has no matching present.{layer}.{kv} "
                                           f"output in {self.onnx_path}")
                i = past[layer][kv]
                shape = list(i.shape)
                if len(shape) != 4:
                    raise FipsRuntimeError(f"{i.name}: expected [batch, kv_heads, past_seq, head_dim], got {shape}")
                heads = _static(shape[1]) or _as_int(find_value(cfg, "num_key_value_heads", "kv_heads",
                                                                "num_attention_heads"))
                head_dim = _static(shape[3]) or _as_int(find_value(cfg, "head_dim"))
                if head_dim is None:
                    hidden = _as_int(find_value(cfg, "hidden_size"))
                    nh = _as_int(find_value(cfg, "num_attention_heads"))
                    head_dim = hidden // nh if hidden and nh else None
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
        if self.vocab_size is None:
            self.vocab_size = _as_int(find_value(cfg, "vocab_size"))
        self.last_logits_only = len(lshape) == 3 and lshape[1] == 1
        mp = _as_int(find_value(cfg, "max_position_embeddings", "max_positions", "n_positions", "max_seq_len",
                                "context_length"))
        self.max_positions = mp if mp and mp > 0 else None
        self._run_outputs = ["logits", *self._present_names]

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise FipsRuntimeError(f"{what} needs a {kind.replace('_', ' ')}; {self.name} is a "
                                   f"{self.kind.replace('_', ' ')}")

    def new_cache(self) -> KVCache:
        """An empty KV cache (past length 0)."""
        self._require("causal_lm", "a KV cache")
        return KVCache([np.zeros(shape, dtype=dt) for shape, dt in self._past_specs], 0)

    def forward(self, ids: Sequence[int], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache | None]:
        """Run ``ids`` after ``cache`` (None: from scratch). Returns the last position's logits (float32
        ``[vocab]``) and the extended cache (None for a model exported without KV cache)."""
        self._require("causal_lm", "forward()")
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
        logits = outs[0].numpy()
        last = np.asarray(logits[0, -1], dtype=np.float32)
        new_cache = KVCache(list(outs[1:]), past_len + n) if cache is not None else None
        return last, new_cache

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
        self._require("causal_lm", "text generation")
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
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
        text = _TextStream(self.tokenizer, prompt_ids, stop) if self._has_tokenizer() else None
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

    # ------------------------------------------------------------------ encoder
    def _setup_encoder(self) -> None:
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
        mp = _as_int(find_value(self.fips_config, "max_position_embeddings", "max_seq_len", "max_length"))
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

    # ------------------------------------------------------------------ image classifier
    def _setup_classifier(self) -> None:
        i = self._inputs["pixel_values"]
        self._pixel_dtype = _np_type(i.type, "pixel_values")
        self.image_shape = tuple(_static(d) for d in i.shape[1:])
        if any(d is None for d in self.image_shape):
            size = find_value(self.fips_config, "image_size", "input_size")
            if isinstance(size, list) and len(size) == 3:
                self.image_shape = tuple(int(x) for x in size)
        out = "logits" if "logits" in self._outputs else self.output_names[0]
        self._logits_output = out
        labels = find_value(self.fips_config, "id2label", "labels", "class_names")
        if isinstance(labels, dict):
            labels = {int(k): str(v) for k, v in labels.items() if str(k).isdigit()}
        elif isinstance(labels, list):
            labels = {j: str(v) for j, v in enumerate(labels)}
        else:
            labels = {}
        self.labels: dict[int, str] = labels
        self.has_kv_cache = False
        self.max_positions = None

    def classify_logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Raw logits ``[n, classes]`` for preprocessed images ``[n, 3, H, W]`` (or one ``[3, H, W]``)."""
        self._require("image_classifier", "classify()")
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


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise FipsRuntimeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature is None or not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise FipsRuntimeError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise FipsRuntimeError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise FipsRuntimeError(f"top_p must be in (0, 1], got {top_p!r}")


# ============================================================================ module-level API
def load(path, **options) -> Model:
    """``Model.load(path, threads=None, kernel="auto", provider="auto", spinning=None)``."""
    return Model.load(path, **options)


def generate(model: Model | str, prompt: str | Sequence[int], **options) -> GenerationResult:
    """Generate with a :class:`Model` (or a model path, loaded for this call)."""
    m = model if isinstance(model, Model) else Model.load(model)
    return m.generate(prompt, **options)


def embed(model: Model | str, texts, **options) -> np.ndarray:
    m = model if isinstance(model, Model) else Model.load(model)
    return m.embed(texts, **options)


def classify(model: Model | str, pixel_values, **options) -> list[list[dict]]:
    m = model if isinstance(model, Model) else Model.load(model)
    return m.classify(pixel_values, **options)
