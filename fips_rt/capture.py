"""Hooks that record what the dense model sees: MLP input statistics and teacher-forced MLP I/O."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .adapters import Adapter, block_paths, get_submodule


class _Stop(Exception):
    pass


def mlp_chain(model, adapter: Adapter, layer: int) -> list[torch.nn.Module]:
    blocks = [bp for stage in block_paths(model, adapter) for bp in stage]
    block = get_submodule(model, blocks[layer])
    return [get_submodule(block, p) for p in adapter.mlp_chain]


def run_chain(chain: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in chain:
        x = m(x)
    return x


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model, batches, kind: str, progress: bool, desc: str):
    from tqdm.auto import tqdm
    from .evaluate import forward
    dev = next(model.parameters()).device
    for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
        try:
            forward(model, {k: v.to(dev) for k, v in b.items()}, kind)
        except _Stop:
            pass


def _tokens_mask(batch: dict) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.reshape(-1).bool()


@torch.no_grad()
def input_statistics(model, adapter: Adapter, layers: list[list[tuple[str, str]]], batches, progress=False):
    """Per layer: X^T X of the MLP input (d x d) and token count; per "out" linear: E[h^2] of its input."""
    stats = {}
    handles = []
    mask_holder = {}
    for li, lin in enumerate(layers):
        chain = mlp_chain(model, adapter, li)

        def pre(mod, args, li=li):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            m = mask_holder.get("mask")
            if m is not None and m.numel() == x.shape[0]:
                x = x[m.to(x.device)]
            s = stats.setdefault(li, {"xtx": 0.0, "n": 0, "h2": {}})
            s["xtx"] = s["xtx"] + (x.T @ x).double().cpu()
            s["n"] += x.shape[0]
        handles.append(chain[0].register_forward_pre_hook(pre))
        for path, orient in lin:
            if orient != "out":
                continue
            mod = get_submodule(model, path)

            def pre_out(mod, args, li=li, path=path):
                h = args[0].detach().float().reshape(-1, args[0].shape[-1])
                m = mask_holder.get("mask")
                if m is not None and m.numel() == h.shape[0]:
                    h = h[m.to(h.device)]
                s = stats[li]["h2"].setdefault(path, [0.0, 0])
                s[0] = s[0] + h.pow(2).sum(0).double().cpu()
                s[1] += h.shape[0]
            handles.append(mod.register_forward_pre_hook(pre_out))
    from tqdm.auto import tqdm
    from .evaluate import forward
    dev = next(model.parameters()).device
    def stop(mod, args, out):
        raise _Stop  # nothing after the last MLP is needed (e.g. the LM head)
    handles.append(mlp_chain(model, adapter, len(layers) - 1)[-1].register_forward_hook(stop))
    with _hooks(handles):
        for b in tqdm(batches, desc="calibration statistics", disable=not progress, leave=False):
            mask_holder["mask"] = _tokens_mask(b)
            try:
                forward(model, {k: v.to(dev) for k, v in b.items()}, adapter.kind)
            except _Stop:
                pass
    return stats


@torch.no_grad()
def teacher_io(model, adapter: Adapter, layer_ids: list[int], batches, progress=False, max_tokens: int | None = None):
    """Dense inputs and outputs of the MLPs of ``layer_ids`` ([tokens, d] each, on the CPU).

    The forward pass stops after the last requested layer's MLP."""
    xs = {li: [] for li in layer_ids}
    ys = {li: [] for li in layer_ids}
    last = max(layer_ids)
    handles = []
    mask_holder = {}
    for li in layer_ids:
        chain = mlp_chain(model, adapter, li)

        def pre(mod, args, li=li):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            m = mask_holder.get("mask")
            xs[li].append((x[m.to(x.device)] if m is not None and m.numel() == x.shape[0] else x).float().cpu())

        def post(mod, args, out, li=li):
            y = out.detach().reshape(-1, out.shape[-1])
            m = mask_holder.get("mask")
            ys[li].append((y[m.to(y.device)] if m is not None and m.numel() == y.shape[0] else y).float().cpu())
            if li == last:
                raise _Stop
        handles.append(chain[0].register_forward_pre_hook(pre))
        handles.append(chain[-1].register_forward_hook(post))
    from tqdm.auto import tqdm
    from .evaluate import forward
    dev = next(model.parameters()).device
    with _hooks(handles):
        for b in tqdm(batches, desc=f"teacher activations (layers {layer_ids[0]}-{last})", disable=not progress,
                      leave=False):
            mask_holder["mask"] = _tokens_mask(b)
            try:
                forward(model, {k: v.to(dev) for k, v in b.items()}, adapter.kind)
            except _Stop:
                pass
            if max_tokens and sum(x.shape[0] for x in xs[last]) >= max_tokens:
                break
    return {li: torch.cat(xs[li]) for li in layer_ids}, {li: torch.cat(ys[li]) for li in layer_ids}


def count_tokens(batches, kind: str) -> int:
    n = 0
    for b in batches:
        if "attention_mask" in b:
            n += int(b["attention_mask"].sum())
        elif kind == "vit":
            n += b["x"].shape[0] * 1024  # upper bound on patches per image, for memory planning only
        else:
            n += b["input_ids"].numel()
    return n


def io_bytes(model, adapter: Adapter, layer_ids: list[int], tokens: int) -> int:
    """Memory the teacher I/O of these layers takes (fp32, input + output per MLP)."""
    from .adapters import get_submodule, linear_paths
    total = 0
    lp = linear_paths(model, adapter)
    for li in layer_ids:
        path, orient = lp[li][0]
        w = get_submodule(model, path).weight
        d = w.shape[1] if orient == "in" else w.shape[0]
        total += 2 * d * tokens * 4
    return total
