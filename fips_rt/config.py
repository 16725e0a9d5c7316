"""Compression configs: frozen dataclasses validated on construction (one handler per config type)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import FipsError

PRUNING = ("gmp", "rigl", "nm")
INITS = ("whitened", "svd")
SELECTIONS = ("magnitude", "obs")
REFITS = ("none", "before", "after", "both")


def _fraction(name: str, value: float | None) -> None:
    if value is not None and not (0.0 < float(value) < 1.0):
        raise FipsError(f"{name} must lie strictly between 0 and 1 (got {value}).")


def _settle_budgets(cfg) -> None:
    """model_budget wins when both budgets are given; the one left must lie in (0, 1)."""
    if cfg.mlp_budget is not None and cfg.model_budget is not None:
        object.__setattr__(cfg, "mlp_budget", None)
    _fraction("mlp_budget", cfg.mlp_budget)
    _fraction("model_budget", cfg.model_budget)


class _DictRoundTrip:
    """``to_dict()`` and ``from_dict(d)`` for the config dataclasses (unknown keys are ignored, so an
    older or newer checkpoint header still loads); ``_tuples`` names list-valued fields that JSON
    turned from tuples into lists."""

    _tuples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in cls._tuples:
            if d.get(k) is not None:
                d[k] = tuple(tuple(v) if isinstance(v, list) else v for v in d[k])
        return cls(**d)


@dataclass(frozen=True)
class FipsConfig(_DictRoundTrip):
    """FiPS: groups of consecutive MLPs share a dense basis U; each linear keeps a sparse V_k.

    Budget: give ``mlp_budget`` (fraction of MLP parameters kept) or ``model_budget`` (fraction of
    whole-model parameters kept; converted to an MLP budget for the model at hand).
    """

    mlp_budget: float | None = 0.5
    model_budget: float | None = None
    group_size: int = 4
    groups: tuple[tuple[int, ...], ...] | None = None  # explicit groups of layer indices
    sparsity: float = 0.75  # final sparsity of V (fraction of zeros)
    init: str = "whitened"  # "whitened" (activation-aware, default) or "svd" (plain, for comparison)
    ridge: float = 1e-2  # ridge added to the normalized covariance before Cholesky
    overcomplete_tau: float = 32.0  # r > rank: extra V rows are copies of the top rows / tau
    pruning: str = "gmp"  # "gmp" (cubic schedule), "rigl" (drop / regrow), "nm" (N:M)
    # which V entries are kept: "magnitude" in the whitened space (down_proj: times sqrt E[h^2]), or "obs":
    # down_proj's d_ff side weighted by 1 / [C^-1]_cc of its input's full covariance (second-order saliency
    # with the re-solve the refit does; gate/up are already exact OBS in the whitened space)
    selection: str = "magnitude"
    nm: tuple[int, int] = (2, 4)
    initial_sparsity: float = 0.5  # V is pruned to this at init when training follows (GMP start)
    gmp_end: float = 0.75  # fraction of the local steps at which the final sparsity is reached
    mask_every: int = 0  # steps between mask updates; 0 = about 10 updates over the ramp
    rigl_drop: float = 0.1  # RigL initial drop fraction, cosine-decayed
    # local error minimization (teacher-forced, per MLP, the MLPs of a group jointly)
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 512
    # global error minimization (distillation to the dense model: KL on logits / MSE on outputs)
    global_steps: int = 0
    global_lr: float = 1e-4
    global_batch: int = 2  # calibration rows per distillation step (0: a whole calibration batch)
    global_seq_len: int = 0  # tokens per row in a distillation step: a random window of the row (0: whole row)
    global_norms: bool = False  # distillation also trains the norm weights (besides U, V, MLP biases)
    # levers (docs/quality.md, benchmarks/results/quality_ablation_cpu.md)
    sequential: bool = False  # local fit on inputs from the already-compressed groups (targets stay dense)
    refit: str = "none"  # closed-form refits in the whitened space: "none", "before"/"after" the local steps, "both"
    refit_rounds: int = 2  # alternations V (gate/up, then down) -> U per refit (2 beat 1 on both domains)
    refit_u: bool = True  # also refit the shared U by its normal equations (V fixed)
    refit_ridge: float = 0.1  # ridge toward the current value, relative to the Hessian's mean diagonal
    refit_iters: int = 25  # conjugate-gradient iterations per solve
    refit_target: str = "output"  # down_proj: fit the dense MLP output ("output") or its dense weight ("weight")
    seed: int = 0
    activation_memory_gb: float = 4.0  # teacher MLP I/O held at once (more groups per calibration pass)
    keep_teacher: bool = False  # keep a dense copy for teacher I/O of groups that did not fit in one pass

    def __post_init__(self):
        if self.mlp_budget is None and self.model_budget is None:
            raise FipsError("Give a budget: mlp_budget or model_budget.")
        _settle_budgets(self)
        if not (0.0 <= self.sparsity < 1.0):
            raise FipsError(f"sparsity must lie in [0, 1) (got {self.sparsity}).")
        if self.init not in INITS:
            raise FipsError(f"init must be one of {', '.join(INITS)} (got {self.init!r}).")
        if self.selection not in SELECTIONS:
            raise FipsError(f"selection must be one of {', '.join(SELECTIONS)} (got {self.selection!r}).")
        if self.selection == "obs" and self.init != "whitened":
            raise FipsError("selection 'obs' needs the whitened init (its saliency is defined in the whitened space).")
        if self.pruning not in PRUNING:
            raise FipsError(f"pruning must be one of {', '.join(PRUNING)} (got {self.pruning!r}).")
        if self.pruning == "nm":
            n, m = self.nm
            if not (0 < n < m):
                raise FipsError(f"nm must be N:M with 0 < N < M (got {n}:{m}).")
            object.__setattr__(self, "sparsity", 1.0 - n / m)
        if self.groups is None and self.group_size < 1:
            raise FipsError(f"group_size must be >= 1 (got {self.group_size}).")
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        if self.refit not in REFITS:
            raise FipsError(f"refit must be one of {', '.join(REFITS)} (got {self.refit!r}).")
        if self.refit_target not in ("output", "weight"):
            raise FipsError(f"refit_target must be output or weight (got {self.refit_target!r}).")
        if self.refit_ridge < 0:
            raise FipsError(f"refit_ridge must be >= 0 (got {self.refit_ridge}).")
        for name in ("steps", "global_steps", "batch_tokens", "global_batch", "global_seq_len", "mask_every",
                     "refit_rounds", "refit_iters"):
            if getattr(self, name) < 0:
                raise FipsError(f"{name} must be >= 0 (got {getattr(self, name)}).")
        if not (self.global_lr > 0 and math.isfinite(self.global_lr)):
            raise FipsError(f"global_lr must be a finite number > 0 (got {self.global_lr}).")
        if not (0.0 <= self.initial_sparsity <= self.sparsity):
            object.__setattr__(self, "initial_sparsity", min(max(self.initial_sparsity, 0.0), self.sparsity))

    method = "fips"
    _tuples = ("groups", "nm")



@dataclass(frozen=True)
class DeltaConfig(_DictRoundTrip):
    """DeltaLLM: follower blocks share an anchor block's weights; each adds a low-rank delta A·B.

    W_f = s·W_a + A·B, s fitted per linear by weighted least squares (``anchor_scale="fit"``, the default:
    a trained LLM's blocks are nearly uncorrelated, so s is small and the delta need not cancel W_a first);
    ``anchor_scale="one"`` is the paper's W_a + A·B. The defaults: the followers are the least influential
    blocks (``layout="influence"``, the blocks block drop would remove), every linear is shared
    (``share_attention``), and the linears that write to the residual stream start at zero
    (``residual_init="zero"``), so training starts from the block-drop model and grows the deltas. The
    distillation trains A, B at ``lr`` and, with ``train_scope="blocks"`` (the default), every other block
    parameter at ``block_lr``, as block drop's heal does; ``"deltas"`` trains A, B only (the paper). The
    paper's form: ``layout="sequential", share_attention=False, anchor_scale="one", residual_init="fit",
    train_scope="deltas"``. Measured effects: docs/deltallm.md.

    Budget: ``model_budget`` (fraction of whole-model parameters kept) or ``mlp_budget`` (fraction of
    MLP parameters kept). Without ``delta_rank``/``share_size`` the solver picks the share size and the
    rank that meet the budget (within ``budget_tol``) with the smallest activation-weighted
    reconstruction error of the shared weights (docs/deltallm.md). Field names match the CLI flags
    (``--delta-rank``, ``--layout``, ``--keep-first``, ``--keep-last``, ``--steps`` ...).
    """

    model_budget: float | None = 0.88
    mlp_budget: float | None = None
    delta_rank: int | None = None  # None: chosen from the budget
    # "sequential" (anchor first in its unit) | "alternating" (anchor in the middle) | "influence" (followers:
    # the least influential blocks, those block drop removes; each shares the nearest other block's weights)
    layout: str = "influence"
    share_size: int | None = None  # blocks per sharing unit (anchor + followers); None: from the budget
    max_share_size: int = 8  # largest unit the solver tries
    keep_first: int = 2
    keep_last: int = 2
    share_attention: bool = True  # also share q/k/v/o (every other linear of the block); False: the MLP only
    init: str = "weighted"  # "weighted" (activation-weighted truncated SVD of the delta) | "svd" (plain)
    anchor_scale: str = "fit"  # "fit": W_f = s W_a + A B, s by weighted least squares | "one": W_a + A B (the paper)
    # "fit": every delta from the (weighted) SVD of W_f - s W_a | "zero": the linears that write to the residual
    # stream (Adapter.residual_out: attention output, MLP down) start at s = 0 and A = 0, so a pre-norm follower
    # block starts as the identity (the block-drop model) and training grows its deltas from there
    residual_init: str = "zero"
    ridge: float = 1e-2  # ridge on the normalized input covariance before Cholesky
    budget_tol: float = 0.005  # params / params_dense must lie in [budget - tol, budget]
    # distillation with progressive module replacement
    steps: int = 200
    lr: float = 1e-3  # the deltas' (A, B) learning rate
    warmup: int = 10
    batch: int = 2  # calibration rows (sequences) per training step
    hidden_mse: float = 0.0  # weight of the hidden-state MSE term next to KL
    train_norms: bool = False
    train_scope: str = "blocks"  # "blocks": also every other block parameter (at block_lr) | "deltas": A, B only
    block_lr: float = 1e-4  # learning rate of the non-delta parameters with train_scope="blocks"
    replace_start: float = 0.3  # replacement probability at step 0 (rises linearly ...)
    replace_end: float = 0.7  # ... to 1 at this fraction of the steps
    save_every: int = 50  # steps between checkpoints of the trainable tensors (with state_dir)
    seed: int = 0

    method = "deltallm"

    def __post_init__(self):
        if self.mlp_budget is None and self.model_budget is None:
            if self.delta_rank is None or self.share_size is None:
                raise FipsError("Give a budget (model_budget or mlp_budget), or both delta_rank and share_size.")
        _settle_budgets(self)
        if self.layout not in ("sequential", "alternating", "influence"):
            raise FipsError(f"layout must be sequential, alternating or influence (got {self.layout!r}).")
        if self.residual_init not in ("fit", "zero"):
            raise FipsError(f"residual_init must be fit or zero (got {self.residual_init!r}).")
        if self.init not in ("weighted", "svd"):
            raise FipsError(f"init must be weighted or svd (got {self.init!r}).")
        if self.anchor_scale not in ("one", "fit"):
            raise FipsError(f"anchor_scale must be one or fit (got {self.anchor_scale!r}).")
        if self.train_scope not in ("deltas", "blocks"):
            raise FipsError(f"train_scope must be deltas or blocks (got {self.train_scope!r}).")
        if not self.block_lr > 0:
            raise FipsError(f"block_lr must be > 0 (got {self.block_lr}).")
        if self.delta_rank is not None and self.delta_rank < 1:
            raise FipsError(f"delta_rank must be >= 1 (got {self.delta_rank}).")
        if self.share_size is not None and self.share_size < 2:
            raise FipsError(f"share_size must be >= 2 (got {self.share_size}).")
        if self.max_share_size < 2:
            raise FipsError(f"max_share_size must be >= 2 (got {self.max_share_size}).")
        if self.keep_first < 0 or self.keep_last < 0:
            raise FipsError("keep_first and keep_last must be >= 0.")
        for name in ("steps", "warmup", "save_every"):
            if getattr(self, name) < 0:
                raise FipsError(f"{name} must be >= 0 (got {getattr(self, name)}).")
        if self.batch < 1:
            raise FipsError(f"batch must be >= 1 (got {self.batch}).")
        if self.lr <= 0:
            raise FipsError(f"lr must be > 0 (got {self.lr}).")
        if self.hidden_mse < 0:
            raise FipsError(f"hidden_mse must be >= 0 (got {self.hidden_mse}).")
        if not (0.0 <= self.replace_start <= 1.0):
            raise FipsError(f"replace_start must lie in [0, 1] (got {self.replace_start}).")
        if not (0.0 <= self.replace_end <= 1.0):
            raise FipsError(f"replace_end must lie in [0, 1] (got {self.replace_end}).")
        if not (0.0 <= self.budget_tol < 0.5):
            raise FipsError(f"budget_tol must lie in [0, 0.5) (got {self.budget_tol}).")
        if self.ridge < 0:
            raise FipsError(f"ridge must be >= 0 (got {self.ridge}).")


CONFIG_TYPES = {"fips": FipsConfig, "deltallm": DeltaConfig}


def config_from_dict(method: str, d: dict[str, Any]):
    if method not in CONFIG_TYPES:
        raise FipsError(f"Unknown method {method!r}; known: {', '.join(CONFIG_TYPES)}.")
    return CONFIG_TYPES[method].from_dict(d)
