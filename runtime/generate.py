"""Inference with exported fips-rt models: the public entry points (text generation with a KV cache,
embeddings, image classification). Torch-free and transformers-free.

    from fips_rt.runtime import Model
    m = Model.load("runs/smollm2-fips/")            # folder with model.onnx + tokenizer files
    print(m.generate("The capital of France is", max_new_tokens=20).text)
    for chunk in m.stream("Once upon a time", max_new_tokens=50, temperature=0.8, seed=1):
        print(chunk.text, end="", flush=True)
    m.chat([{"role": "user", "content": "Hi!"}]).text

The code lives by concern: ``tokenizer`` (tokenizer files, chat template), ``sampling`` (next-token
choice), ``streaming`` (results, incremental detokenization with tokenizers' DecodeStream), ``model``
(one class per model kind: ``CausalLM``, ``Encoder``, ``ImageClassifier``) and ``contract`` (the
``fips_config.json`` schema). Model kinds (``Model.kind``) are the contract's: ``causal-lm``,
``encoder``, ``vit``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import CausalLM, Encoder, ImageClassifier, KVCache, Model
from .sampling import check_sampling, sample_next_token
from .session import FipsRuntimeError
from .streaming import GenerationChunk, GenerationResult, TextStream
from .tokenizer import ChatTemplate, Tokenizer

_TextStream = TextStream  # the old private name, kept for callers of 0.1

__all__ = ["Model", "CausalLM", "Encoder", "ImageClassifier", "KVCache", "Tokenizer", "ChatTemplate",
           "GenerationChunk", "GenerationResult", "TextStream", "load", "generate", "embed", "classify",
           "sample_next_token", "check_sampling", "FipsRuntimeError"]


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
