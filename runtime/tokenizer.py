"""The tokenizer of an exported model folder (tokenizers' ``tokenizer.json``) and its chat template.

Torch- and transformers-free. ``tokenizer_config.json``, ``special_tokens_map.json`` and the chat template
files are the tokenizer's own files, read defensively (a missing file or key is not an error); the chat
template runs in jinja2's immutable sandbox.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from .session import FipsRuntimeError, read_json

__all__ = ["Tokenizer", "ChatTemplate"]


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

    def __init__(self, model_dir: str | Path, *, eos_token_ids: Iterable[int] = ()):
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
        eos.update(int(x) for x in eos_token_ids)
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

    def decode_stream(self, prefix_ids: Sequence[int] = ()):
        """A ``tokenizers.decoders.DecodeStream`` primed with ``prefix_ids`` (context, not output)."""
        from tokenizers.decoders import DecodeStream
        ids = [int(i) for i in prefix_ids]
        try:
            return DecodeStream(ids=ids, skip_special_tokens=True)
        except TypeError:  # tokenizers < 0.22 has no ids=: prime the stream by stepping through the context
            stream = DecodeStream(skip_special_tokens=True)
            for i in ids:
                stream.step(self._tok, i)
            return stream

    def decode_step(self, stream, token_id: int) -> str:
        """The text ``token_id`` completes in ``stream`` ("" while a UTF-8 sequence is incomplete)."""
        try:
            return stream.step(self._tok, int(token_id)) or ""
        except Exception as e:  # an id outside the vocabulary
            raise FipsRuntimeError(f"cannot decode token id {token_id}: {e}") from None

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
