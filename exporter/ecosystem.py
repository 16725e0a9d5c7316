"""Sidecars for the ecosystem's loaders: what Hugging Face Optimum / transformers and onnxruntime-genai
need to open an export folder as written (docs/runtime.md, "Loading an export elsewhere").

- ``config.json``: the source model's Hugging Face config (``architectures``, ``model_type``, ``use_cache``
  set from the graph). A FiPS or DeltaLLM graph has the dense architecture's inputs and outputs, so the
  dense config is the right one for it too.
- ``generation_config.json`` (causal LMs): the model's generation config, with the bos / eos / pad ids
  of ``fips_config.json``, so a loader stops where ``fips_rt.runtime`` stops.
- ``tokenizer_config.json``: rewritten to name ``PreTrainedTokenizerFast`` (transformers 5 saves
  ``TokenizersBackend``, a name older transformers does not know; both load the generic class, which is
  exactly ``tokenizer.json``, the file the runtime reads) and ``model_input_names`` = the graph's text
  inputs (otherwise the generic class also returns ``token_type_ids``, which a decoder graph lacks).
- ``genai_config.json`` (causal LMs): onnxruntime-genai's model description: I/O names, KV-cache name
  patterns, head counts, token ids. It names no custom-op library: the ``fips.SparseMatMul`` nodes run
  on their function bodies unless the user copies the kernel library into the folder and names it
  there (onnxruntime-genai only loads one from inside the model folder).

None of these is read by ``fips_rt.runtime`` (it reads ``fips_config.json``, ``tokenizer.json`` and the
special tokens / chat template of ``tokenizer_config.json``, which are left as they were).
"""
from __future__ import annotations

import json

# the tokenizer class every transformers version resolves to the tokenizers-library backend
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TEXT_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# model types onnxruntime-genai 0.18 knows for decoders; anything else is described as its generic "decoder"
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "smollm3", "granite", "olmo",
                         "nemotron", "phi3", "gemma", "gpt2"})
_PRIVATE_KEYS = ("_name_or_path", "_commit_hash", "_attn_implementation_autoset", "_from_model_config",
                 "_original_object_hash")


def _dumps(d: dict) -> bytes:
    return (json.dumps(d, indent=2, ensure_ascii=False, default=str) + "\n").encode()


def _to_dict(obj, *, use_diff: bool = False) -> dict | None:
    """A transformers config (PretrainedConfig / GenerationConfig) as plain JSON, or None."""
    to_json = getattr(obj, "to_json_string", None)
    if obj is None or not callable(to_json):
        return None
    try:
        d = json.loads(to_json(use_diff=use_diff))
    except Exception:  # noqa: BLE001 - a config that does not serialize: write none rather than fail the export
        return None
    for k in _PRIVATE_KEYS:
        d.pop(k, None)
    return d


def _input_names(record: dict) -> list[str]:
    return [t["name"] for t in record.get("inputs", [])]


def hf_config(model, record: dict) -> dict | None:
    """``config.json``: the model's HF config made to describe the graph, or None (no HF config: timm)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        return None
    d = _to_dict(cfg)
    if d is None:
        return None
    d.pop("quantization_config", None)  # GGUF sources: the graph holds dequantized weights
    d["architectures"] = [record["architecture"]]
    if record.get("model_type"):
        d["model_type"] = record["model_type"]
    if record["kind"] == "causal-lm":
        d["use_cache"] = any(n.startswith("past_key_values.") for n in _input_names(record))
    rope = d.get("rope_parameters")  # transformers 5's spelling; readers of transformers 4 look for these
    if isinstance(rope, dict) and "rope_theta" in rope:
        d.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and d.get("rope_scaling") is None:
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    dtype = {"fp32": "float32", "fp16": "float16"}.get(record.get("dtype"))
    for key in ("dtype", "torch_dtype"):  # transformers 5 / 4 spelling; keep whichever the config has
        if key in d and dtype:
            d[key] = dtype
    return d


def _token_ids(record: dict) -> dict:
    eos = [int(i) for i in record.get("eos_token_ids") or []]
    pad = record.get("pad_token_id")
    out = {"bos_token_id": record.get("bos_token_id"), "eos_token_id": eos or None,
           "pad_token_id": pad if pad is not None else (eos[0] if eos else None)}
    return {k: v for k, v in out.items() if v is not None}


def generation_config(model, record: dict) -> dict:
    """``generation_config.json`` for a causal LM: the model's, with the contract's special token ids."""
    d = _to_dict(getattr(model, "generation_config", None), use_diff=True) or {}
    d.update(_token_ids(record))
    return d


def genai_config(record: dict) -> dict:
    """``genai_config.json`` (onnxruntime-genai) for a causal LM with the standard I/O names."""
    names = set(_input_names(record))
    outputs = {t["name"] for t in record.get("outputs", [])}
    inputs = {"input_ids": "input_ids"}
    for n in ("attention_mask", "position_ids"):
        if n in names:
            inputs[n] = n
    past, present = record["past_key_values"], record["present"]
    inputs["past_key_names"] = past["key"].replace("{i}", "%d")
    inputs["past_value_names"] = past["value"].replace("{i}", "%d")
    out = {"logits": "logits" if "logits" in outputs else record["outputs"][0]["name"],
           "present_key_names": present["key"].replace("{i}", "%d"),
           "present_value_names": present["value"].replace("{i}", "%d")}
    context = int(record.get("max_position_embeddings") or 2048)
    model_type = str(record.get("model_type") or "").lower()
    ids = _token_ids(record)
    return {
        "model": {
            **ids,
            "context_length": context,
            "decoder": {
                # onnxruntime-genai takes "custom_ops_library" here: a path inside this folder (see docs/runtime.md)
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": record["model_file"],
                "head_size": int(record["head_dim"]), "hidden_size": int(record["hidden_size"]),
                "inputs": inputs, "outputs": out,
                "num_attention_heads": int(record["num_attention_heads"]),
                "num_hidden_layers": int(record["num_layers"]),
                "num_key_value_heads": int(record["num_kv_heads"]),
            },
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "vocab_size": int(record["vocab_size"]),
        },
        # greedy by default; the present grows by the new tokens (past + seq), so no shared buffer
        "search": {"do_sample": False, "early_stopping": True, "max_length": context, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def tokenizer_config(files: dict[str, bytes], record: dict) -> None:
    """Point ``tokenizer_config.json`` at the generic fast tokenizer (``tokenizer.json``) and the graph's
    text inputs, in place in ``files``; nothing when there is no ``tokenizer.json``."""
    if "tokenizer.json" not in files or "tokenizer_config.json" not in files:
        return
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["tokenizer_class"] = TOKENIZER_CLASS
    for k in ("is_local", "local_files_only"):  # load-time arguments transformers 5 saves; not tokenizer settings
        cfg.pop(k, None)
    names = set(_input_names(record))
    wanted = [n for n in TEXT_INPUTS if n in names]
    if wanted:
        cfg["model_input_names"] = wanted
    files["tokenizer_config.json"] = _dumps(cfg)


def loader_files(model, record: dict, files: dict[str, bytes]) -> dict[str, bytes]:
    """The loaders' sidecars for an export whose contract is ``record``; ``files`` (the tokenizer files)
    has its ``tokenizer_config.json`` adjusted in place."""
    tokenizer_config(files, record)
    out: dict[str, bytes] = {}
    cfg = hf_config(model, record)
    if cfg is not None:
        out["config.json"] = _dumps(cfg)
    if record["kind"] == "causal-lm":
        out["generation_config.json"] = _dumps(generation_config(model, record))
        names = set(_input_names(record))
        if "input_ids" in names and any(n.startswith("past_key_values.") for n in names):
            out["genai_config.json"] = _dumps(genai_config(record))
    return out
