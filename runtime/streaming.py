"""What generation returns: chunks and results, and the incremental detokenizer with stop strings."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["GenerationChunk", "GenerationResult", "TextStream"]


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


class TextStream:
    """Incremental detokenization with stop strings, at a constant cost per token.

    tokenizers' ``DecodeStream`` turns each new token into the text it completes (nothing while a UTF-8
    sequence is still incomplete), primed with the last few prompt tokens so that a leading space decodes
    as it does in the whole text. Only ``pending`` -- text not released yet, never longer than the longest
    stop string plus the newest piece -- is scanned for stop strings, and any tail of it that could still
    grow into a stop string is held back. Streaming and non-streaming use this same object, so they
    produce the same text. ``work`` is the number of characters the last :meth:`push` looked at (tests
    check that it does not grow with the position).
    """

    CONTEXT = 4

    def __init__(self, tokenizer: "Tokenizer", prompt_ids: Sequence[int], stop: Sequence[str]):
        self.tok = tokenizer
        self._stream = tokenizer.decode_stream(list(prompt_ids[-self.CONTEXT:]))
        self.stop = [s for s in stop if s]
        self.pending = ""        # decoded, not yet released
        self.stopped = False
        self.work = 0

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly releasable text. Sets ``stopped`` when a stop string appears."""
        piece = self.tok.decode_step(self._stream, int(token_id))
        buf = self.pending + piece
        self.work = len(buf)
        if self.stop:
            hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.pending = ""
                return buf[:min(hits)]
        safe = len(buf)
        while safe > 0 and buf[safe - 1] == "\ufffd":  # an undecodable byte run may still complete
            safe -= 1
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if buf[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        self.pending = buf[safe:]
        return buf[:safe]

    def flush(self) -> str:
        """At the end: release everything still held back."""
        out, self.pending = self.pending, ""
        return out
