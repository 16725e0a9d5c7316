"""Export configs, one per architecture family (optimum's ``model_configs.py`` pattern).

A config knows how to build the graph, which inputs to validate it on, how to compute the
PyTorch reference, and what goes into ``fips_config.json``. Tolerances are class attributes,
refined by inheritance where an architecture needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from fips_rt.errors import FipsError

from .builder import GraphBuilder
from .layers import plan_fips
from .report import OutputCheck, compare

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")
SENTENCES = ("A man is playing a guitar.", "The new movie is awesome and everyone should see it soon.")


def _np_float(dtype: str):
    return np.float16 if dtype == "fp16" else np.float32


class ExportConfig:
    family: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    # validation tolerances: pass iff max|onnx - torch| <= ATOL + RTOL * max|torch|
    ATOL: ClassVar[dict[str, float]] = {"fp32": 1e-4, "fp16": 2e-2}
    RTOL: ClassVar[dict[str, float]] = {"fp32": 1e-5, "fp16": 1e-2}

    # quantized weights (fips export --weights int8|int4): the parity check against the float PyTorch model
    # is a gross-error check (a wrong layout or node gives errors of the order of the logits themselves);
    # the quality of a quantized file is measured by its perplexity (fips eval FILE.onnx)
    # (pass iff mean |onnx - torch| <= QUANT_MEAN_RTOL * mean |torch| per output; report.OutputCheck)
    # measured on SmolLM2 (worst output): FiPS int8 0.10 (0.29 with 8-bit U), FiPS int4 0.68; unrelated
    # outputs of the same scale
    # (a wrong layout or node) give ~1.4 (sqrt 2 for Gaussians)
    QUANT_MEAN_RTOL: ClassVar[dict[str, float]] = {"int8": 0.4, "int4": 0.8}
    QUANT_ATOL: ClassVar[dict[str, float]] = {"int8": 0.0, "int4": 0.0}  # (the max bound is not applied)
    QUANT_RTOL: ClassVar[dict[str, float]] = {"int8": 0.0, "int4": 0.0}
    # hand-built graphs have the quantizable MatMul form; the torch.onnx ones (timm ViTs) do not
    QUANTIZABLE: ClassVar[bool] = True

    def __init__(self, lm, *, dtype: str, opset: int, last_logits_only: bool = False, weights: str | None = None,
                 sparse_group_size: int | None = None, basis_weights: str = "int8", sparse_activation_bits: int = 0):
        self.lm = lm
        self.model = lm.model
        self.dtype = dtype
        self.opset = opset
        self.last_logits_only = last_logits_only
        self.weights = weights or dtype
        self.sparse_group_size = sparse_group_size
        self.basis_weights = basis_weights
        self.sparse_activation_bits = sparse_activation_bits
        self.build_facts: dict = {}  # what the builder knew that quantization needs (basis nodes, tied head)

    @property
    def quantized(self) -> bool:
        return self.weights in self.QUANT_ATOL

    def tol(self) -> tuple[float, float]:
        if self.quantized:
            return self.QUANT_ATOL[self.weights], self.QUANT_RTOL[self.weights]
        return self.ATOL[self.dtype], self.RTOL[self.dtype]

    def build(self, scratch: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
        """The ModelProto and a tag per initializer name (for byte accounting)."""
        raise NotImplementedError

    def validate(self, session) -> list[OutputCheck]:
        raise NotImplementedError

    def hand_built(self, build_fn, **kwargs) -> tuple[onnx.ModelProto, dict[str, str]]:
        """``build`` for the hand-built graphs: ``build_fn(builder, model, **kwargs)`` on a fresh
        GraphBuilder that knows the model's used FiPS basis directions."""
        b = GraphBuilder(self.dtype, self.opset)
        if self.quantized:
            b.matmul_form = True
            b.sparse_bits = {"int8": 8, "int4": 4}[self.weights]
            b.sparse_group_size = self.sparse_group_size
            b.basis_float = self.basis_weights == "fp32"
            b.sparse_activation_bits = self.sparse_activation_bits
        plan_fips(b, self.model, balance=self.quantized and self.basis_weights == "int8")
        build_fn(b, self.model, **kwargs)
        self.build_facts = {"basis_nodes": set(b.basis_nodes), "tied_head": dict(b.memo.get("tied_head", {})),
                            "bases": len(b.memo.get("basis_names", {})),
                            "balanced": sum(1 for s in b.memo.get("basis_scale", {}).values() if s is not None)}
        return b.make_model(type(self.model).__name__, doc="fips-rt export"), dict(b.tags)

    def contract_spec(self):
        """This kind's record of the export contract (fips_rt.runtime.contract)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- decoders
def _cache_kv(cache, i: int):
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


class CausalLMConfig(ExportConfig):
    """Llama, Qwen2/Qwen3, Mistral, SmolLM: hand-built decoder with KV cache (decoder.py)."""

    family = "llama"
    kind = "causal-lm"
    ATOL = {"fp32": 1e-4, "fp16": 5e-2}
    RTOL = {"fp32": 2e-5, "fp16": 2e-2}

    def build(self, scratch):
        from .decoder import build_causal_lm
        return self.hand_built(build_causal_lm, family=self.family, last_logits_only=self.last_logits_only)

    # -- validation: a left-padded batch of two prompts, then one decode step with the KV cache
    def _prompt_batch(self):
        tok = self.lm.tokenizer
        vocab = self.model.config.vocab_size
        if tok is not None:
            seqs = [list(tok(p)["input_ids"]) for p in PROMPTS]
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        else:
            rng = np.random.default_rng(0)
            seqs = [list(rng.integers(0, vocab, 7)), list(rng.integers(0, vocab, 5))]
            pad = 0
        S = max(len(s) for s in seqs)
        ids = np.full((len(seqs), S), pad, np.int64)
        mask = np.zeros((len(seqs), S), np.int64)
        for i, s in enumerate(seqs):
            ids[i, S - len(s):] = s
            mask[i, S - len(s):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return ids, mask, pos

    def _dims(self):
        from .decoder import decoder_dims
        return decoder_dims(self.model.config)

    def empty_past(self, batch: int) -> dict:
        d = self._dims()
        z = np.zeros((batch, d["num_kv_heads"], 0, d["head_dim"]), _np_float(self.dtype))
        return {f"past_key_values.{i}.{kv}": z for i in range(d["num_layers"]) for kv in ("key", "value")}

    def _compare_step(self, step, names, outs, ref, mask, atol, rtol) -> list[OutputCheck]:
        got = dict(zip(names, outs))
        ref_logits = ref.logits.detach().float().numpy()
        if self.last_logits_only and ref_logits.shape[1] > 1:
            ref_logits = ref_logits[:, -1:]
        valid = mask[:, -ref_logits.shape[1]:, None].astype(bool)
        checks = [compare(step, "logits", ref_logits, got["logits"], atol, rtol, valid)]
        for i in range(self._dims()["num_layers"]):
            for kv, ref_t in zip(("key", "value"), _cache_kv(ref.past_key_values, i)):
                ref_t = ref_t.detach().float().numpy()
                g = got[f"present.{i}.{kv}"]
                t_ref = ref_t.shape[2]
                if g.ndim == 4 and t_ref <= g.shape[2]:  # sliding-window caches keep only the tail
                    g = g[:, :, g.shape[2] - t_ref:]
                checks.append(compare(step, f"present.{i}.{kv}", ref_t, g, atol, rtol,
                                      mask[:, None, -t_ref:, None].astype(bool)))
        return checks

    def validate(self, session):
        import torch
        atol, rtol = self.tol()
        ids, mask, pos = self._prompt_batch()
        names = [o.name for o in session.get_outputs()]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **self.empty_past(ids.shape[0])}
        outs = session.run(None, feeds)
        with torch.no_grad():
            ref = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(pos), use_cache=True)
        checks = self._compare_step("prefill", names, outs, ref, mask, atol, rtol)
        # decode one token, feeding the ONNX model its own cache
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True).numpy().astype(np.int64)
        mask2 = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        pos2 = pos[:, -1:] + 1
        got = dict(zip(names, outs))
        feeds2 = {"input_ids": nxt, "attention_mask": mask2, "position_ids": pos2}
        for i in range(self._dims()["num_layers"]):
            for kv in ("key", "value"):
                feeds2[f"past_key_values.{i}.{kv}"] = got[f"present.{i}.{kv}"]
        outs2 = session.run(None, feeds2)
        with torch.no_grad():
            ref2 = self.model(input_ids=torch.from_numpy(nxt), attention_mask=torch.from_numpy(mask2),
                              position_ids=torch.from_numpy(pos2), past_key_values=ref.past_key_values, use_cache=True)
        return checks + self._compare_step("decode", names, outs2, ref2, mask2, atol, rtol)

    def contract_spec(self):
        from fips_rt.runtime.contract import CausalLMSpec

        from .decoder import layer_windows
        cfg = self.model.config
        tok = self.lm.tokenizer
        eos: list[int] = []
        for src in (getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
                    getattr(cfg, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
            for e in (src if isinstance(src, (list, tuple)) else [src]):
                if e is not None and int(e) not in eos:
                    eos.append(int(e))
        windows = layer_windows(cfg)

        def opt_int(v):
            return None if v is None else int(v)
        return CausalLMSpec(
            **{k: int(v) for k, v in self._dims().items()},
            max_position_embeddings=opt_int(getattr(cfg, "max_position_embeddings", None)),
            sliding_windows=tuple(opt_int(w) for w in windows) if any(w is not None for w in windows) else None,
            eos_token_ids=tuple(eos),
            bos_token_id=opt_int(tok.bos_token_id if tok is not None else getattr(cfg, "bos_token_id", None)),
            pad_token_id=opt_int(tok.pad_token_id if tok is not None else getattr(cfg, "pad_token_id", None)),
            chat_template=bool(tok is not None and getattr(tok, "chat_template", None)),
            last_logits_only=bool(self.last_logits_only))


class Gemma2Config(CausalLMConfig):
    """Gemma-2: embedding scaling, (1 + w) norms, pre/post feed-forward norms, soft-capping, sliding windows."""

    family = "gemma2"
    ATOL = {"fp32": 1e-4, "fp16": 5e-2}
    RTOL = {"fp32": 2e-5, "fp16": 2e-2}


# ---------------------------------------------------------------------------------------------- encoders
class BertConfig(ExportConfig):
    family = "bert"
    kind = "encoder"
    ATOL = {"fp32": 1e-4, "fp16": 2e-2}
    RTOL = {"fp32": 1e-5, "fp16": 1e-2}

    def build(self, scratch):
        from .encoder import build_encoder
        return self.hand_built(build_encoder)

    def _batch(self):
        tok = self.lm.tokenizer
        if tok is not None:
            enc = tok(list(SENTENCES), padding=True, return_tensors="np")
            ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
            tt = enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)
            return ids, mask, tt
        rng = np.random.default_rng(0)
        ids = rng.integers(0, self.model.config.vocab_size, (2, 9)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0
        tt = np.zeros_like(ids)
        tt[:, 4:] = 1
        return ids, mask, tt

    def validate(self, session):
        import torch
        atol, rtol = self.tol()
        ids, mask, tt = self._batch()
        outs = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})))
        with torch.no_grad():
            h = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           token_type_ids=torch.from_numpy(tt)).last_hidden_state
            m = torch.from_numpy(mask)[..., None].float()
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return [compare("forward", "last_hidden_state", h.numpy(), outs["last_hidden_state"], atol, rtol),
                compare("forward", "sentence_embedding", pooled.numpy(), outs["sentence_embedding"], atol, rtol)]

    def contract_spec(self):
        from fips_rt.runtime.contract import EncoderSpec
        cfg = self.model.config
        return EncoderSpec(hidden_size=int(cfg.hidden_size), num_layers=int(cfg.num_hidden_layers),
                           num_attention_heads=int(cfg.num_attention_heads), vocab_size=int(cfg.vocab_size),
                           max_position_embeddings=int(cfg.max_position_embeddings), pooling="mean",
                           embedding_output="sentence_embedding")


# ---------------------------------------------------------------------------------------------- vision
class TimmConfig(ExportConfig):
    """timm ViT / DeiT through torch.onnx.export with lowered linears (vision.py)."""

    family = "vit"
    kind = "vit"
    QUANTIZABLE = False  # built by torch.onnx (Gemm/MatMul layout not ours)
    ATOL = {"fp32": 1e-4, "fp16": 2e-2}
    RTOL = {"fp32": 1e-5, "fp16": 1e-2}

    def image_size(self) -> list[int]:
        if self.lm.extra.get("image_size"):
            return [int(v) for v in self.lm.extra["image_size"]]
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if size is not None:
            chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
            return [int(chans), int(size[0]), int(size[1])]
        return [int(v) for v in self.model.pretrained_cfg.get("input_size", (3, 224, 224))]

    def build(self, scratch):
        import copy

        from .vision import export_timm
        model = self.model if self.dtype == "fp32" else copy.deepcopy(self.model)  # fp16 tracing casts in place
        proto = export_timm(model, str(Path(scratch) / "traced.onnx"), dtype=self.dtype, opset=self.opset,
                            image_size=self.image_size())
        return proto, self._tags(proto)

    def _tags(self, proto) -> dict[str, str]:
        from fips_rt.adapters import linear_paths
        mlp_paths = tuple(f"{p}." for layer in linear_paths(self.model, self.lm.adapter) for p, _ in layer)
        return {t.name: "mlp" if t.name.startswith(mlp_paths) or t.name.startswith("fips.basis.") else "other"
                for t in proto.graph.initializer}

    def validate(self, session):
        import torch
        atol, rtol = self.tol()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *self.image_size(), generator=gen)
        with torch.no_grad():
            ref = self.model(x).float().numpy()
        got = session.run(None, {"pixel_values": x.numpy().astype(_np_float(self.dtype))})[0]
        return [compare("forward", "logits", ref, got, atol, rtol)]

    def contract_spec(self):
        from fips_rt.runtime.contract import VisionSpec
        pcfg = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        classes = getattr(self.model, "num_classes", None)
        return VisionSpec(image_size=tuple(self.image_size()), num_classes=int(classes) if classes else None,
                          preprocessing={k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()
                                         if k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")})


class SwinConfig(TimmConfig):
    family = "swin"


CONFIGS: dict[str, type[ExportConfig]] = {c.family: c for c in (CausalLMConfig, Gemma2Config, BertConfig, TimmConfig,
                                                                  SwinConfig)}


def config_for(lm) -> type[ExportConfig]:
    family = lm.adapter.family
    if family not in CONFIGS:
        raise FipsError(f"Export of the {family} family ({type(lm.model).__name__}) is not supported; "
                        f"exportable families: {', '.join(CONFIGS)}.")
    return CONFIGS[family]
