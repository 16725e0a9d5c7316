"""Tiny random models of every supported family (for tests of all three layers; no downloads)."""
from __future__ import annotations

from .models import LoadedModel, _finish, _hf_config_dict, tokenizer_files

FAMILIES = ("llama", "qwen2", "gemma2", "bert", "deit", "swin")
# decoder variants of the Llama adapter the exporter also covers (a sliding window; q/k norms)
MORE_DECODERS = ("mistral", "qwen3")


def tiny_model(family: str, *, layers: int = 4, seed: int = 0, vocab_size: int = 256, tokenizer=None) -> LoadedModel:
    import torch
    torch.manual_seed(seed)
    if family in ("llama", "qwen2", "gemma2", "bert") + MORE_DECODERS:
        import transformers as T
        common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4)
        if family == "llama":
            cfg = T.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=True, rms_norm_eps=1e-5)
            model = T.LlamaForCausalLM(cfg)
        elif family == "qwen2":
            cfg = T.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=False)
            model = T.Qwen2ForCausalLM(cfg)
        elif family == "gemma2":
            cfg = T.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                 sliding_window=16, query_pre_attn_scalar=16)
            model = T.Gemma2ForCausalLM(cfg)
        elif family == "mistral":
            cfg = T.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=256, sliding_window=4,
                                  tie_word_embeddings=False)
            model = T.MistralForCausalLM(cfg)
        elif family == "qwen3":
            cfg = T.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                tie_word_embeddings=True)
            model = T.Qwen3ForCausalLM(cfg)
        else:
            cfg = T.BertConfig(**common, max_position_embeddings=128)
            model = T.BertModel(cfg)
        # random weights of std 0.02 make every MLP nearly linear; widen them so tests mean something
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.normal_(0, 1.0 / p.shape[1] ** 0.5)
        source = {"type": "hf", "class": type(model).__name__, "config": _hf_config_dict(model.config),
                  "tokenizer_files": tokenizer_files(tokenizer)}
        return _finish(model, tokenizer, source, f"tiny-{family}")
    if family in ("deit", "swin"):
        import timm
        if family == "deit":
            kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=layers, num_heads=4, num_classes=10)
            name = "deit_tiny_patch16_224"
        else:
            kwargs = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                          window_size=4, num_classes=10)
            name = "swin_tiny_patch4_window7_224"
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = {"type": "timm", "name": name, "kwargs": kwargs}
        lm = _finish(model, None, source, f"tiny-{family}")
        lm.extra["image_size"] = [3, 32, 32]
        return lm
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES + MORE_DECODERS}")
