"""Real models installed from the package index: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2."""
import copy

import pytest
import torch

from fips_rt import FipsConfig, compress_
from fips_rt.accounting import count_model
from fips_rt.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.real


def test_smollm2_budget_numbers_and_checkpoint(smollm2, tmp_path):
    from fips_rt.data import lm_batches
    from safetensors.torch import save_model
    lm = copy.deepcopy(smollm2)
    dense_file = tmp_path / "dense.safetensors"
    save_model(lm.model, str(dense_file))  # tied embedding stored once, fp32
    calib = lm_batches(lm.tokenizer, "wiki", "train", 1024, 256, 4)
    rep = compress_(lm, FipsConfig(mlp_budget=0.5, group_size=4, sparsity=0.75, steps=0), calib, log=lambda *a: None)
    ranks = [g["rank"] for g in rep.details["groups"]]
    assert ranks == [1024] * 7 + [921]
    c = count_model(lm.model, lm.adapter)
    assert c["mlp_params_dense"] == 79_626_240
    assert c["mlp_params"] == 39_811_392
    assert c["mlp_bytes"] == 176_821_632
    out = tmp_path / "model.pt"
    save_checkpoint(out, lm, "fips", {}, rep.to_dict())
    assert out.stat().st_size <= 0.76 * dense_file.stat().st_size
    # the file loads with weights_only=True, and the rebuilt model gives the same logits
    raw = torch.load(str(out), weights_only=True)
    assert raw["format"] == "fips-rt"
    lm2 = load_checkpoint(out)
    ids = calib[0]["input_ids"][:2, :64]
    with torch.no_grad():
        a, b = lm.model(input_ids=ids).logits, lm2.model(input_ids=ids).logits
    assert float((a - b).abs().max()) <= 1e-5
    assert lm2.tokenizer is not None and lm2.tokenizer("hello")["input_ids"] == lm.tokenizer("hello")["input_ids"]


def test_smollm2_dense_perplexity_is_sane(smollm2):
    from fips_rt.data import lm_batches
    from fips_rt.evaluate import perplexity
    batches = lm_batches(smollm2.tokenizer, "wiki", "test", 1024, 256, 4)
    ppl = perplexity(smollm2.model, batches)["ppl"]
    assert 5 < ppl < 40  # the real model on real text (dense ~15 on these articles)


def test_wiki_splits_do_not_leak():
    from fips_rt.data import wiki_articles
    tr, va, te = (set(t for t, _ in wiki_articles(s)) for s in ("train", "validation", "test"))
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    n = len(tr) + len(va) + len(te)
    assert 0.05 < len(te) / n < 0.15


def test_minilm_loads_and_compresses():
    from fips_rt.data import encoder_batches, sentences
    from fips_rt.evaluate import embedding_similarity, sentence_embeddings
    from fips_rt.models import load_model
    lm = load_model("minilm-l6")
    assert lm.adapter.family == "bert" and lm.kind == "encoder"
    pair = encoder_batches(lm.tokenizer, ["A cat sits on the mat.", "A kitten is sitting on a rug.",
                                          "Stock markets fell sharply today."])
    e = sentence_embeddings(lm.model, pair)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])  # real weights: similar sentences are closer
    dense = copy.deepcopy(lm.model)
    calib = encoder_batches(lm.tokenizer, sentences("wiki", "train", 64))
    compress_(lm, FipsConfig(mlp_budget=0.5, group_size=2, sparsity=0.5, steps=0), calib, log=lambda *a: None)
    sim = embedding_similarity(dense, lm.model, encoder_batches(lm.tokenizer, sentences("wiki", "test", 32)))
    assert sim["cosine_mean"] > 0.5
