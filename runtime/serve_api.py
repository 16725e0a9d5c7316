"""The request and response bodies of ``fips serve`` (pydantic models; FastAPI serves their JSON schema).

Requests are strict: unknown fields are refused (``extra="forbid"``), values are not coerced (``"5"`` is not
an integer, ``true`` is not a number), numbers must be finite and in range. Fields OpenAI defines but this
server does not implement are accepted only at their neutral value (``n: 1``, ``echo: false``, penalties 0,
...). What depends on the model or on the server's limits (prompt length, ``max_tokens`` upper bound, token
ids in the vocabulary) is checked by :mod:`fips_rt.runtime.serve` once the prompt is tokenized.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest", "ChatMessage", "TextPart",
           "StreamOptions", "Completion", "ChatCompletion", "EmbeddingList", "ModelCard", "ModelList", "Health",
           "ErrorResponse"]

Int64 = Annotated[int, Field(ge=0, le=(1 << 63) - 1)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
Zero = Annotated[float, Field(ge=0, le=0)]
One = Annotated[int, Field(ge=1, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormatText(_Strict):
    type: Literal["text"]


class _Sampling(_Strict):
    model: Optional[str] = Field(None, description="Accepted and not checked: the response names the served model.")
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description="Tokens to generate; at most the server's --max-tokens-limit and what the context leaves.")
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = Field(None, description="0: greedy. Default 1.")
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=0, le=1 << 30)]] = Field(None, description="0: no top-k cut.")
    seed: Optional[Int64] = None
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=4)], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = False
    stop_token_ids: Optional[Annotated[list[Annotated[int, Field(ge=0, le=1 << 31)]], Field(max_length=64)]] = None
    # OpenAI fields accepted at their neutral value only
    n: Optional[One] = None
    presence_penalty: Optional[Zero] = None
    frequency_penalty: Optional[Zero] = None
    logit_bias: Optional[Annotated[dict[str, float], Field(max_length=0)]] = None
    user: Optional[Annotated[str, Field(max_length=256)]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="A string, an array of strings, an array of token ids or an array of arrays of token ids.")
    best_of: Optional[One] = None
    echo: Optional[Literal[False]] = None
    logprobs: Union[Literal[False], Annotated[int, Field(ge=0, le=0)], None] = None
    suffix: Optional[Annotated[str, Field(max_length=0)]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[Annotated[str, Field(max_length=256)]] = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    logprobs: Optional[Literal[False]] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=0)]] = None
    parallel_tool_calls: Optional[bool] = None
    tool_choice: Optional[Literal["none"]] = None
    tools: Optional[Annotated[list[dict[str, Any]], Field(max_length=0)]] = None
    response_format: Optional[ResponseFormatText] = None
    service_tier: Optional[Annotated[str, Field(max_length=64)]] = None
    store: Optional[Literal[False]] = None
    metadata: Optional[Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]] = None


class EmbeddingRequest(_Strict):
    input: Union[str, list[str]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[Annotated[str, Field(max_length=256)]] = None
    dimensions: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="Not supported (refused when given).")


# ---------------------------------------------------------------------------- responses (documentation + checks)
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str
    max_positions: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]
    model: str
    kind: str
    kernel: Optional[str] = None
    provider: Optional[str] = None
    requests: int
    active: int
    queued: int
    max_batch: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
