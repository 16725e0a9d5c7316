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
def hooks_removed(handles):
    """Remove the hook handles when the block ends (also on an error)."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Tokens:
    """The current calibration batch's attention mask. ``rows(t)``: t ([..., features]) as
    [tokens, features] without the padding tokens (all tokens when there is no mask or the
    shapes do not line up, e.g. a ViT's patch tokens)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])
        m = self.mask
        return t[m.to(t.device)] if m is not None and m.numel() == t.shape[0] else t


def _raise_stop(mod, args, out):
    raise _Stop  # nothing after this point of the forward is needed


@torch.no_grad()
def forward_batches(model, adapter: Adapter, batches, tokens: Tokens, handles: list, *, stop_layer: int, desc: str,
                    progress: bool = False, before_batch=None, done=None) -> None:
    """Run ``model`` on every batch with the caller's hooks (``handles``, removed afterwards), each
    forward cut short after the MLP of layer ``stop_layer``. ``tokens.mask`` follows the batch;
    ``before_batch()`` runs before each batch, ``done()`` after each one ends the loop early."""
    from tqdm.auto import tqdm
    from .evaluate import forward
    handles = list(handles) + [mlp_chain(model, adapter, stop_layer)[-1].register_forward_hook(_raise_stop)]
    dev = next(model.parameters()).device
    with hooks_removed(handles):
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            tokens.mask = _tokens_mask(b)
            if before_batch is not None:
                before_batch()
            try:
                forward(model, {k: v.to(dev) for k, v in b.items()}, adapter.kind)
            except _Stop:
                pass
            if done is not None and done():
                break


def _tokens_mask(batch: dict) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.reshape(-1).bool()


def _statistics_hooks(model, adapter: Adapter, layers, tokens: Tokens, stats: dict, layer_ids=None,
                      full_out: bool = False) -> list:
    """Per layer: X^T X of the MLP input (d x d) and token count; per "out" linear: E[h^2] of its input
    (``"h2"``) and with ``full_out`` also its whole second moment H^T H (``"hth"``, d_ff x d_ff, float64:
    FipsConfig.selection="obs"). ``layer_ids``: only these layers (default all)."""
    handles = []
    for li, lin in enumerate(layers):
        if layer_ids is not None and li not in layer_ids:
            continue
        def pre(mod, args, li=li):
            x = tokens.rows(args[0]).float()
            s = stats.setdefault(li, {"xtx": 0.0, "n": 0, "h2": {}})
            s["xtx"] = s["xtx"] + (x.T @ x).double().cpu()
            s["n"] += x.shape[0]
        handles.append(mlp_chain(model, adapter, li)[0].register_forward_pre_hook(pre))
        for path, orient in lin:
            if orient != "out":
                continue

            def pre_out(mod, args, li=li, path=path):
                h = tokens.rows(args[0]).float()
                s = stats[li]["h2"].setdefault(path, [0.0, 0])
                s[0] = s[0] + h.pow(2).sum(0).double().cpu()
                s[1] += h.shape[0]
                if full_out:
                    f = stats[li].setdefault("hth", {}).setdefault(path, [0.0, 0])
                    f[0] = f[0] + (h.T @ h).double().cpu()
                    f[1] += h.shape[0]
            handles.append(get_submodule(model, path).register_forward_pre_hook(pre_out))
    return handles


def _io_hooks(model, adapter: Adapter, layer_ids: list[int], tokens: Tokens, xs: dict, ys: dict) -> list:
    """Record the input and the output of the MLPs of ``layer_ids`` (fp32, CPU, padding dropped)."""
    handles = []
    for li in layer_ids:
        chain = mlp_chain(model, adapter, li)

        def pre(mod, args, li=li):
            xs[li].append(tokens.rows(args[0]).float().cpu())

        def post(mod, args, out, li=li):
            ys[li].append(tokens.rows(out).float().cpu())
        handles.append(chain[0].register_forward_pre_hook(pre))
        handles.append(chain[-1].register_forward_hook(post))
    return handles


def linear_input_covariances(model, adapter: Adapter, paths_by_layer: dict[int, list[str]], batches,
                             progress: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """X^T X (float64, CPU) and token count of the input of each linear (``{layer: [path, ...]}``),
    padding tokens excluded. Linears of one layer fed by the same tensor in one forward (gate/up,
    q/k/v) are computed once and share the entry. The forward stops after the last layer's MLP."""
    acc: dict[str, list] = {}
    alias: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    tokens = Tokens()
    handles = []
    for li, paths in paths_by_layer.items():
        for path in paths:
            def pre(mod, args, path=path, li=li):
                x = args[0]
                # per layer: a freed tensor's address may be reused by a later layer's input
                key = (li, x.data_ptr(), tuple(x.shape))
                first = seen.setdefault(key, path)
                if first != path:
                    alias[path] = first
                    return
                x = tokens.rows(x).float()
                a = acc.setdefault(path, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device), 0])
                a[0] += (x.T @ x).double()
                a[1] += x.shape[0]
            handles.append(get_submodule(model, path).register_forward_pre_hook(pre))
    forward_batches(model, adapter, batches, tokens, handles, stop_layer=max(paths_by_layer),
                    desc="linear input statistics", progress=progress, before_batch=seen.clear)
    out = {p: (a[0].cpu(), a[1]) for p, a in acc.items()}
    for p, first in alias.items():
        out.setdefault(p, out[first])
    return out


def input_statistics(model, adapter: Adapter, layers: list[list[tuple[str, str]]], batches, progress=False,
                     full_out: bool = False):
    """Per layer: X^T X of the MLP input (d x d) and token count; per "out" linear: E[h^2] of its input
    (and with ``full_out`` its H^T H; see _statistics_hooks)."""
    stats, tokens = {}, Tokens()
    forward_batches(model, adapter, batches, tokens,
                    _statistics_hooks(model, adapter, layers, tokens, stats, full_out=full_out),
                    stop_layer=len(layers) - 1, desc="calibration statistics", progress=progress)
    return stats


def teacher_io(model, adapter: Adapter, layer_ids: list[int], batches, progress=False, max_tokens: int | None = None):
    """Dense inputs and outputs of the MLPs of ``layer_ids`` ([tokens, d] each, on the CPU).

    The forward pass stops after the last requested layer's MLP."""
    xs, ys, tokens = {li: [] for li in layer_ids}, {li: [] for li in layer_ids}, Tokens()
    last = max(layer_ids)
    done = (lambda: sum(x.shape[0] for x in xs[last]) >= max_tokens) if max_tokens else None
    forward_batches(model, adapter, batches, tokens, _io_hooks(model, adapter, layer_ids, tokens, xs, ys),
                    stop_layer=last, desc=f"teacher activations (layers {layer_ids[0]}-{last})", progress=progress,
                    done=done)
    return {li: torch.cat(xs[li]) for li in layer_ids}, {li: torch.cat(ys[li]) for li in layer_ids}


def statistics_and_io(model, adapter: Adapter, layers: list[list[tuple[str, str]]], layer_ids: list[int], batches,
                      progress=False):
    """``input_statistics`` and ``teacher_io(layer_ids)`` from one pass of the dense model."""
    stats, tokens = {}, Tokens()
    xs, ys = {li: [] for li in layer_ids}, {li: [] for li in layer_ids}
    handles = (_statistics_hooks(model, adapter, layers, tokens, stats)
               + _io_hooks(model, adapter, layer_ids, tokens, xs, ys))
    forward_batches(model, adapter, batches, tokens, handles, stop_layer=len(layers) - 1,
                    desc="calibration statistics and activations", progress=progress)
    return stats, ({li: torch.cat(xs[li]) for li in layer_ids}, {li: torch.cat(ys[li]) for li in layer_ids})


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
