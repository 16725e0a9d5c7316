"""The one training loop of fips-rt, and its learning-rate schedule.

Every trained stage runs through ``train_loop``:

- FiPS local error minimization (``fips.fit_mlps_local``: one group's MLPs, teacher-forced MSE; also
  ``baselines.train_local_``),
- FiPS global distillation (``fips.train_global``: KL to the dense model's logits),
- DeltaLLM distillation with progressive replacement and block-drop healing (``deltallm.distill_train``,
  used by ``blockdrop.heal_``).

The loop owns what they share: the optimizer steps (the caller's factory builds one optimizer over all
tensors, or, with ``per_tensor``, one per tensor stepped inside backward the moment its gradient is
complete, so only one gradient is in memory at a time), the learning rate (``lr_factor``: linear warm-up,
then cosine decay to 0; each caller passes its warm-up), per-tensor hooks around each update (FiPS keeps
V inside its mask with them), the progress bar, the per-step callback (tests use it to interrupt a
run) and the resumable state file (trainable tensors + optimizer state + losses, written under a
temporary name and renamed). What differs stays with the caller: the parameters, the optimizer factory,
and ``loss(step)`` (data sampling, teacher forward, progressive replacement), plus step hooks (mask
schedules). There is no per-method branch in here. No caller clips gradients.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FipsError


# --------------------------------------------------------------------------- schedule (pure)
def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``steps``: linear warm-up over
    ``warmup`` steps ((step + 1) / warmup, capped at 1), times a cosine decay from 1 at step 0 to 0 at
    ``steps``."""
    if steps <= 0:
        return 1.0
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def fips_warmup(steps: int) -> int:
    """The warm-up of FiPS's local and global stages: steps / 20, at least one step."""
    return max(1, steps // 20)


def loss_summary(losses: list[float]) -> dict:
    """The first loss and the mean of the last ten."""
    tail = losses[-10:]
    return {"loss_first": losses[0] if losses else None, "loss_last": sum(tail) / len(tail) if tail else None}


def _step_callback(step: int, loss: float) -> None:
    """Called after every finished training step of every loop (tests patch it to simulate an interruption)."""


# --------------------------------------------------------------------------- resumable state
@dataclass
class StateFile:
    """Where and how often ``train_loop`` saves what a resumed run needs: the tensors of ``named``, the
    optimizer state, the losses so far and ``meta`` (the settings; a state made with other settings is
    refused on resume). Written every ``every`` steps and after the last one (``every`` 0: never)."""

    path: Path
    named: dict[str, torch.Tensor]
    every: int = 0
    meta: dict | None = None
    resume: bool = False

    def due(self, done: int, steps: int) -> bool:
        return bool(self.every) and (done % self.every == 0 or done == steps)

    def save(self, done: int, optimizers: Sequence[torch.optim.Optimizer], losses: list[float]) -> None:
        opt = optimizers[0].state_dict() if len(optimizers) == 1 else [o.state_dict() for o in optimizers]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"step": done, "params": {k: v.detach().cpu() for k, v in self.named.items()}, "opt": opt,
                    "losses": list(losses), "meta": self._meta()}, tmp)
        tmp.replace(self.path)

    def load(self, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[int, list[float]] | None:
        """(steps done, losses) of a saved run, its tensors and optimizer state restored; None when there is
        nothing to resume."""
        if not (self.resume and self.path.is_file()):
            return None
        st = torch.load(str(self.path), map_location="cpu", weights_only=True)
        opts = st.get("opt")
        opts = [opts] if isinstance(opts, dict) else list(opts or [])
        if st.get("meta") != self._meta() or set(st["params"]) != set(self.named) or len(opts) != len(optimizers):
            raise FipsError(f"--resume: {self.path} was made with other settings; use a new --state-dir.")
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(st["params"][k].to(p.device))
        for o, s in zip(optimizers, opts):
            o.load_state_dict(s)
        return int(st["step"]), list(st["losses"])

    def _meta(self) -> dict:
        return json.loads(json.dumps(self.meta or {}))


# --------------------------------------------------------------------------- the loop
Hook = Callable[[torch.nn.Parameter], None]


def train_loop(loss: Callable[[int], torch.Tensor], params: Sequence[torch.nn.Parameter],
               optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], *, steps: int, warmup: int,
               per_tensor: bool = False, before_update: Hook | None = None, after_update: Hook | None = None,
               after_backward: Callable[[int], None] | None = None, after_step: Callable[[int], None] | None = None,
               state: StateFile | None = None, desc: str = "training", progress: bool = False,
               postfix: Callable[[], dict] | None = None, postfix_every: int = 1, log=print) -> dict:
    """Minimize ``loss(step)`` over ``params`` for ``steps`` steps; returns {"losses", "resumed_at"}.

    ``optimizer(tensors)`` builds an optimizer; its learning rate is the base rate, scaled at every step
    by ``lr_factor(step, steps, warmup)``. One optimizer holds every tensor, stepped after the backward
    pass, or, with ``per_tensor``, each tensor has its own, stepped inside the backward pass as soon as
    its gradient is complete (the gradient is freed right after; for elementwise optimizers such as
    AdamW the update is the same). ``before_update(p)`` sees each tensor's gradient right before its
    update, ``after_update(p)`` runs right after it; ``after_backward(step)`` sees every raw gradient
    before any update (not with ``per_tensor``); ``after_step(step)`` runs after the step. A loss that
    needs no gradient skips the update. ``params`` need gradients during the loop and do not afterwards.
    With ``state``, a run resumes from its state file and saves it as it goes."""
    from tqdm.auto import tqdm
    params = list(params)
    if per_tensor and after_backward is not None:
        raise ValueError("after_backward needs every raw gradient at once; it does not go with per_tensor.")
    for p in params:
        p.requires_grad_(True)
    opts = [optimizer([p]) for p in params] if per_tensor else [optimizer(params)]
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    start, losses = 0, []
    resumed = state.load(opts) if state is not None else None
    if resumed is not None:
        start, losses = resumed
        log(f"resumed training at step {start} of {steps} from {state.path}")
    handles = []
    if per_tensor:
        by_id = {id(p): o for p, o in zip(params, opts)}

        def update(p):
            if before_update is not None:
                before_update(p)
            by_id[id(p)].step()
            p.grad = None
            if after_update is not None:
                after_update(p)
        handles = [p.register_post_accumulate_grad_hook(update) for p in params]
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            f = lr_factor(step, steps, warmup)
            for o, lrs in zip(opts, base):
                for g, lr in zip(o.param_groups, lrs):
                    g["lr"] = lr * f
            value = loss(step)
            if not per_tensor:
                opts[0].zero_grad(set_to_none=True)
            if value.requires_grad:  # e.g. every compressed block drawn dense this step: nothing to train
                value.backward()  # with per_tensor, the hooks update every tensor
                if not per_tensor:
                    if after_backward is not None:
                        after_backward(step)
                    if before_update is not None:
                        for p in params:
                            if p.grad is not None:
                                before_update(p)
                    opts[0].step()
                    if after_update is not None:
                        for p in params:
                            after_update(p)
            if after_step is not None:
                after_step(step)
            losses.append(float(value.detach()))
            if progress and step % postfix_every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", **(postfix() if postfix is not None else {}))
            if state is not None and state.due(step + 1, steps):
                state.save(step + 1, opts, losses)
            _step_callback(step, losses[-1])
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return {"losses": losses, "resumed_at": start}
