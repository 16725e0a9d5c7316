"""Evaluation: perplexity (causal LMs), embedding cosine (encoders), logit agreement (ViTs).

Dense and compressed models are always evaluated on the same batches; ratios are reported."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def forward(model, batch: dict, kind: str) -> torch.Tensor:
    """The tensor a kind is judged on: LM logits, encoder last hidden state, ViT logits."""
    if kind == "vit":
        return model(batch["x"])
    out = model(**batch)
    return out.logits if kind == "causal-lm" else out.last_hidden_state


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, batches: list[dict], progress: bool = False, desc: str = "perplexity") -> dict:
    from tqdm.auto import tqdm
    dev = _device_of(model)
    nll, count = 0.0, 0
    for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids = b["input_ids"].to(dev)
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict]) -> torch.Tensor:
    dev = _device_of(model)
    outs = []
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items()}
        outs.append(F.normalize(mean_pool(model(**b).last_hidden_state.float(), b["attention_mask"]), dim=-1).cpu())
    return torch.cat(outs)


@torch.no_grad()
def embedding_similarity(dense, compressed, batches: list[dict]) -> dict:
    a, b = sentence_embeddings(dense, batches), sentence_embeddings(compressed, batches)
    cos = (a * b).sum(-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "n": int(cos.numel())}


@torch.no_grad()
def retrieval_agreement(dense, compressed, query_batches: list[dict], corpus_batches: list[dict]) -> float:
    """Share of queries whose top-1 corpus neighbour is the same for both models."""
    qa, ca = sentence_embeddings(dense, query_batches), sentence_embeddings(dense, corpus_batches)
    qb, cb = sentence_embeddings(compressed, query_batches), sentence_embeddings(compressed, corpus_batches)
    return float(((qa @ ca.T).argmax(-1) == (qb @ cb.T).argmax(-1)).float().mean())


@torch.no_grad()
def logit_agreement(dense, compressed, batches: list[dict]) -> dict:
    dev_d, dev_c = _device_of(dense), _device_of(compressed)
    agree, n, kl = 0, 0, 0.0
    for b in batches:
        ld = dense(b["x"].to(dev_d)).float().cpu()
        lc = compressed(b["x"].to(dev_c)).float().cpu()
        agree += int((ld.argmax(-1) == lc.argmax(-1)).sum())
        n += ld.shape[0]
        kl += float(F.kl_div(F.log_softmax(lc, -1), F.log_softmax(ld, -1), log_target=True, reduction="sum"))
    return {"top1_agreement": agree / n, "kl": kl / n, "n": n}
