"""Block-drop baseline (ShortGPT-style): drop the most redundant blocks, then heal by distillation.

Redundancy of a block = mean cosine similarity between its input and output hidden states on
calibration data (ShortGPT's Block Influence is 1 - that). Blocks are dropped, most redundant first,
until the parameter count is <= the target. ``heal_`` trains with the same loss, schedule and
sampler as DeltaLLM (deltallm.distill_train).
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter, adapter_for, block_paths, get_submodule, set_submodule
from .delta_math import block_cosine, blocks_to_drop
from .errors import FipsError


def _module_and_lm(model):
    """(nn.Module, LoadedModel or None): functions here take either."""
    if isinstance(model, nn.Module):
        return model, None
    return model.model, model


@torch.no_grad()
def block_cosines(model, adapter: Adapter, batches: list[dict]) -> list[float]:
    """Per block (flat order), the mean cosine between its input and output hidden states."""
    from .evaluate import forward
    paths = [bp for stage in block_paths(model, adapter) for bp in stage]
    acc = [[0.0, 0] for _ in paths]
    holder = {}

    def make(i):
        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            holder[i] = x.detach()

        def post(mod, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            s, n = block_cosine(holder.pop(i), y.detach(), holder.get("mask"))
            acc[i][0] += s
            acc[i][1] += n
        return pre, post
    handles = []
    for i, p in enumerate(paths):
        pre, post = make(i)
        m = get_submodule(model, p)
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    dev = next(model.parameters()).device
    try:
        for b in batches:
            mask = b.get("attention_mask")
            holder.clear()
            if mask is not None:
                holder["mask"] = mask.reshape(-1).bool().to(dev)
            forward(model, {k: v.to(dev) for k, v in b.items()}, adapter.kind)
    finally:
        for h in handles:
            h.remove()
    return [s / max(n, 1) for s, n in acc]


def _params(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def remove_blocks_(model, adapter: Adapter, drop: list[int]) -> None:
    """Remove blocks (flat indices) from their ModuleList; renumber ``layer_idx`` (KV cache slots) and
    shrink ``config.num_hidden_layers`` (and ``layer_types`` where the config has one)."""
    stages = block_paths(model, adapter)
    if len(stages) != 1:
        raise FipsError("block drop supports models with one list of blocks.")
    list_path = stages[0][0].rsplit(".", 1)[0]
    old = get_submodule(model, list_path)
    keep = [i for i in range(len(old)) if i not in set(drop)]
    set_submodule(model, list_path, nn.ModuleList([old[i] for i in keep]))
    for new_i, block in enumerate(get_submodule(model, list_path)):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(keep)
        lt = getattr(cfg, "layer_types", None)
        if isinstance(lt, (list, tuple)) and len(lt) == len(old):
            cfg.layer_types = [lt[i] for i in keep]


def sync_source_config(lm) -> None:
    """Copy the (changed) HF config into ``lm.source`` so a checkpoint rebuilds the dropped architecture."""
    if lm is None or lm.source.get("type") != "hf":
        return
    src = lm.source["config"]
    cfg = lm.model.config
    src["num_hidden_layers"] = cfg.num_hidden_layers
    if "layer_types" in src and getattr(cfg, "layer_types", None) is not None:
        src["layer_types"] = list(cfg.layer_types)


def drop_blocks_(model, adapter: Adapter | None, target_params: float, calibration: list[dict]) -> dict:
    """Drop the most redundant blocks until params <= target (an absolute count, or a fraction of the
    dense count when <= 1). ``model``: an nn.Module or a LoadedModel (then its source config is updated
    too, so save_checkpoint/load_checkpoint rebuild the shorter model)."""
    module, lm = _module_and_lm(model)
    adapter = adapter or adapter_for(module)
    if not calibration:
        raise FipsError("block drop needs calibration data to score the blocks.")
    total = _params(module)
    target = target_params * total if target_params <= 1.0 else float(target_params)
    paths = [bp for stage in block_paths(module, adapter) for bp in stage]
    cos = block_cosines(module, adapter, calibration)
    sizes = [_params(get_submodule(module, p)) for p in paths]
    drop = blocks_to_drop(cos, sizes, total, target)
    remove_blocks_(module, adapter, drop)
    sync_source_config(lm)
    after = _params(module)
    return {"method": "blockdrop", "dropped": drop, "cosines": cos, "params_dense": total, "params": after,
            "ratio": after / total, "target": target}


def heal_(model, teacher, batches: list[dict], steps: int, lr: float, *, adapter: Adapter | None = None,
          batch_rows: int = 2, warmup: int = 10, seed: int = 0, device: torch.device | str = "cpu",
          progress: bool = False, log=print) -> dict:
    """Distill ``teacher`` (the dense model) into the dropped model: same loss (KL on logits), sampler
    and lr schedule as DeltaLLM. Trainable: every parameter of the remaining blocks (attention, MLP,
    norms); embeddings and the LM head stay frozen, as in DeltaLLM."""
    from .deltallm import block_parameters, distill_train
    module, _ = _module_and_lm(model)
    t_module, _ = _module_and_lm(teacher)
    adapter = adapter or adapter_for(module)
    device = torch.device(device)
    module.to(device)
    t_module.to(device).eval()
    for p in t_module.parameters():
        p.requires_grad_(False)
    named = block_parameters(module, adapter)
    out = distill_train(module, t_module, adapter.kind, named, batches, steps=steps, lr=lr, warmup=warmup,
                        batch_rows=batch_rows, seed=seed, device=device, progress=progress, log=log)
    module.eval()
    out["trainable_params"] = sum(p.numel() for p in named.values())
    return out
