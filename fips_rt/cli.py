"""The ``fips`` command. Thin: it parses options and calls the library.

Subcommands of the upper layers (export, bench, serve) are resolved lazily by name, so ``fips bench``
and ``fips serve`` never import torch.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import click

from .errors import FipsError

LAZY = {
    "export": "fips_rt.exporter.cli:export_command",
    "bench": "fips_rt.runtime.cli:bench_command",
    "serve": "fips_rt.runtime.cli:serve_command",
    "generate": "fips_rt.runtime.cli:generate_command",
    "chat": "fips_rt.runtime.cli:chat_command",
}


# what the `compress` extra brings; a command that needs one of them says how to install it
COMPRESS_MODULES = ("torch", "transformers", "timm", "onnx", "scipy", "safetensors", "gguf", "accelerate", "tqdm")


def _needs_compress(command: str | None, module: str | None) -> str:
    what = f"'fips {command}'" if command else "this command"
    return (f"{what} needs the compression side of fips-rt ({module} is not installed): "
            f"pip install \"fips-rt[compress]\"")


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY))

    def get_command(self, ctx, name):
        if name in LAZY:
            mod, attr = LAZY[name].split(":")
            try:
                return getattr(importlib.import_module(mod), attr)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] in COMPRESS_MODULES:
                    raise FipsError(_needs_compress(name, e.name)) from None
                raise FipsError(f"'fips {name}' is unavailable: {e}") from None
            except (ImportError, AttributeError) as e:
                raise FipsError(f"'fips {name}' is unavailable: {e}") from None
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fips-rt")
def cli():
    """fips-rt: shrink transformers by cross-layer parameter sharing (FiPS, DeltaLLM), export them to
    ONNX and run them with onnxruntime.

    \b
    Quick start (the real SmolLM2-135M on wiki text):   fips demo
    Compress:   fips compress smollm2-135m --mlp-budget 0.5 --out model.pt
    Evaluate:   fips eval model.pt --split test
    Inspect:    fips info model.pt
    Export:     fips export model.pt -o model.onnx
    Run:        fips bench model.onnx --baseline dense.onnx ; fips serve model.onnx
    Try:        fips generate model.onnx -p "Once upon a time" ; fips chat model.onnx
    """


# ----------------------------------------------------------------------------- helpers
def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def calibration_for(lm, data: str, tokens: int, seq_len: int, split: str = "train", images: str | None = None,
                    batch_size: int = 4) -> list[dict]:
    from . import data as D
    if lm.kind == "causal-lm":
        if lm.tokenizer is None:
            raise FipsError("This model has no tokenizer; text calibration is impossible.")
        return D.lm_batches(lm.tokenizer, data, split, tokens, seq_len, batch_size)
    if lm.kind == "encoder":
        texts = D.sentences(data, split, max(8, tokens // 64))
        return D.encoder_batches(lm.tokenizer, texts, max_len=128)
    size = lm.extra.get("image_size", [3, 224, 224])
    if images is None:
        _echo("warning: no --images folder given: random images are used (only meaningful for tests).")
    return D.image_batches(images, size, max(8, tokens // 256))


def evaluate_pair(dense_lm, comp_model, data: str, split: str, tokens: int, seq_len: int, progress=True) -> dict:
    """Dense and compressed on identical windows; the ratio is always reported."""
    from . import evaluate as E
    batches = calibration_for(dense_lm, data, tokens, seq_len, split=split)
    if dense_lm.kind == "causal-lm":
        d = E.perplexity(dense_lm.model, batches, progress, "dense perplexity")
        out = {"split": split, "windows": sum(b["input_ids"].shape[0] for b in batches), "seq_len": seq_len,
               "tokens": d["tokens"], "ppl_dense": d["ppl"]}
        if comp_model is not None:
            c = E.perplexity(comp_model, batches, progress, "compressed perplexity")
            out.update(ppl=c["ppl"], ppl_ratio=c["ppl"] / d["ppl"])
        return out
    if dense_lm.kind == "encoder":
        return {"split": split, **(E.embedding_similarity(dense_lm.model, comp_model, batches) if comp_model else {})}
    return {"split": split, **(E.logit_agreement(dense_lm.model, comp_model, batches) if comp_model else {})}


def _is_checkpoint(spec: str) -> bool:
    return spec.endswith(".pt") and Path(spec).exists()


def _load_any(spec: str, checkpoint: str | None = None):
    from .checkpoint import load_checkpoint
    from .models import load_model
    if _is_checkpoint(spec):
        return load_checkpoint(spec), True
    return load_model(spec, checkpoint), False


def _dense_for(header: dict, dense: str | None):
    """The dense model a checkpoint came from (recorded name, or --dense)."""
    from .models import load_model
    spec = dense or header.get("name")
    try:
        return load_model(spec)
    except FipsError as e:
        raise FipsError(f"Cannot load the dense model for comparison ({e}); pass --dense MODEL.") from None


# ----------------------------------------------------------------------------- compress
# compress options that only one method reads (parameter names); the other method refuses them when set
METHOD_ONLY_OPTIONS = {
    "fips": ("group_size", "groups", "sparsity", "init", "selection", "pruning", "nm", "batch_tokens", "global_steps", "global_lr",
             "global_batch", "global_seq_len", "global_norms", "sequential", "refit", "refit_rounds", "refit_u",
             "refit_ridge", "refit_iters", "refit_target", "onload", "activation_memory_gb", "distributed",
             "dist_timeout"),
    "deltallm": ("delta_rank", "layout", "keep_first", "keep_last", "anchor_scale", "residual_init", "share_attention",
                 "train_scope", "block_lr"),
}
METHOD_NAMES = {"fips": "FiPS", "deltallm": "DeltaLLM"}
SHARED_OPTIONS = ("model", "method", "mlp_budget", "model_budget", "calib", "images", "calib_tokens", "seq_len", "steps",
                  "lr", "eval_tokens", "device", "checkpoint", "out", "resume", "keep_state", "seed", "quiet")


def _refuse_other_methods_options(ctx: click.Context | None, method: str) -> None:
    """One line naming the options of the other method that were set explicitly (defaults pass)."""
    if ctx is None:
        return
    from click.core import ParameterSource
    params = {p.name: p for p in ctx.command.params}
    for other, names in METHOD_ONLY_OPTIONS.items():
        if other == method:
            continue
        given = [n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT,
                                                                         ParameterSource.DEFAULT_MAP)]
        if given:
            flags = ", ".join("/".join(params[n].opts + params[n].secondary_opts) for n in given)
            raise FipsError(f"{flags}: {METHOD_NAMES[other]}-only option{'s' if len(given) > 1 else ''}, not used by "
                            f"--method {method} (drop {'them' if len(given) > 1 else 'it'}, or use --method {other}).")


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["fips", "deltallm"]), default="fips", show_default=True)
@click.option("--mlp-budget", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Fraction of MLP parameters kept (default 0.5 for fips).")
@click.option("--model-budget", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Fraction of whole-model parameters kept (alternative to --mlp-budget).")
@click.option("--group-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="FiPS: consecutive MLPs sharing one basis (the last group takes the remainder).")
@click.option("--groups", default=None, help="FiPS: explicit groups, e.g. '0,1,2,3;4,5'.")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True,
              help="FiPS: final fraction of zeros in V.")
@click.option("--init", "init", type=click.Choice(["whitened", "svd"]), default="whitened", show_default=True,
              help="FiPS: shared init of U and V.")
@click.option("--selection", type=click.Choice(["magnitude", "obs"]), default=None,
              help="FiPS: which V entries are kept at init: 'magnitude' in the whitened space, or 'obs' (down_proj "
                   "ranked by second-order saliency from its input's full covariance). Default: FipsConfig's.")
@click.option("--pruning", type=click.Choice(["gmp", "rigl", "nm"]), default="gmp", show_default=True,
              help="FiPS: V mask schedule of the local steps.")
@click.option("--nm", default="2:4", show_default=True, help="FiPS: N:M pattern for --pruning nm.")
@click.option("--calib", default="wiki", show_default=True, help="'wiki' or a .txt/.jsonl file.")
@click.option("--images", default=None, type=click.Path(file_okay=False), help="ViTs: calibration image folder.")
@click.option("--calib-tokens", type=click.IntRange(min=16), default=16384, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=16), default=512, show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=200, show_default=True,
              help="FiPS: local steps per group; DeltaLLM: distillation steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="FiPS: local-step learning rate (default 1e-3); DeltaLLM: the deltas' (default 1e-3).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="FiPS: tokens per local step.")
@click.option("--global-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="FiPS: distillation steps after local training (KL on logits / MSE on outputs).")
@click.option("--global-lr", type=float, default=1e-4, show_default=True, help="FiPS: distillation learning rate.")
@click.option("--global-batch", type=click.IntRange(min=0), default=None,
              help="FiPS: calibration rows per distillation step (default 2; 0: a whole calibration batch).")
@click.option("--global-seq-len", type=click.IntRange(min=0), default=None,
              help="FiPS: tokens per row in a distillation step, a random window of the row (default 0: whole rows).")
@click.option("--global-norms/--no-global-norms", default=None,
              help="FiPS: distillation also trains the norm weights (default: U, V, MLP biases only).")
@click.option("--delta-rank", type=click.IntRange(min=1), default=None, help="DeltaLLM: rank (default: from budget).")
@click.option("--layout", type=click.Choice(["sequential", "alternating", "influence"]), default=None,
              help="DeltaLLM: which blocks follow which anchor: units of consecutive blocks with the anchor first "
                   "(sequential) or in the middle (alternating), or the least influential blocks, those block drop "
                   "removes, each following its nearest other block (influence, the default).")
@click.option("--keep-first", type=click.IntRange(min=0), default=2, show_default=True,
              help="DeltaLLM: first blocks left unshared.")
@click.option("--keep-last", type=click.IntRange(min=0), default=2, show_default=True,
              help="DeltaLLM: last blocks left unshared.")
@click.option("--anchor-scale", type=click.Choice(["one", "fit"]), default=None,
              help="DeltaLLM: W_f = W_a + A B (one, the paper's) or W_f = s W_a + A B with s fitted by "
                   "least squares per linear (fit, the default; s = 0 skips the shared product).")
@click.option("--residual-init", type=click.Choice(["fit", "zero"]), default=None,
              help="DeltaLLM: the deltas of the linears that write to the residual stream (attention output, MLP "
                   "down) from the SVD fit (fit) or zero with s = 0 (zero: a follower block starts as the identity, "
                   "i.e. at the block-drop model, and training grows it; the default).")
@click.option("--share-attention/--no-share-attention", default=None,
              help="DeltaLLM: followers share (and add deltas to) the attention linears too, not only the MLP's "
                   "(default: on).")
@click.option("--train-scope", type=click.Choice(["deltas", "blocks"]), default=None,
              help="DeltaLLM: train the deltas only, or every block parameter as well at --block-lr (blocks, the "
                   "default).")
@click.option("--block-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="DeltaLLM: learning rate of the non-delta parameters with --train-scope blocks (default 1e-4).")
@click.option("--sequential/--teacher-forcing", default=None,
              help="FiPS: fit each group on inputs from the groups compressed before it (targets stay dense).")
@click.option("--refit", type=click.Choice(["none", "before", "after", "both"]), default=None,
              help="FiPS: closed-form refits of V and U in the whitened space, before/after the local steps.")
@click.option("--refit-rounds", type=click.IntRange(min=1), default=None, help="FiPS: V -> U alternations per refit.")
@click.option("--refit-u/--no-refit-u", default=None, help="FiPS: also refit the shared U.")
@click.option("--refit-ridge", type=click.FloatRange(min=0), default=None,
              help="FiPS: refit ridge toward the current value (relative to the Hessian's mean diagonal).")
@click.option("--refit-iters", type=click.IntRange(min=1), default=None, help="FiPS: CG iterations per refit solve.")
@click.option("--refit-target", type=click.Choice(["output", "weight"]), default=None,
              help="FiPS: down_proj refit target: the dense MLP output or the dense weight.")
@click.option("--eval-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate dense vs compressed on this many validation tokens at the end (0: skip).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--checkpoint", default=None, help="timm models: weights file (.safetensors or .pth).")
@click.option("--out", "out", default="model.pt", show_default=True, help="Output checkpoint (.pt).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its state folder (OUT.state).")
@click.option("--keep-state", is_flag=True,
              help="Keep the state folder (OUT.state: finished groups, packed) after the checkpoint is written.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--onload", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="FiPS: block-by-block onloading from a folder of safetensors (only the block being worked on is "
                   "in memory; auto: on for folders over 2 GiB of weights and for --distributed).")
@click.option("--activation-memory-gb", type=click.FloatRange(min=0), default=None,
              help="FiPS: calibration activations held in memory (default 4); past it they go to the state folder "
                   "(block-by-block) or to later calibration passes.")
@click.option("--distributed", is_flag=True,
              help="FiPS: spread the groups over the ranks of torchrun (gloo on CPU, nccl on GPUs); implied when "
                   "WORLD_SIZE is set.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="FiPS: seconds a rank waits for the others before the run fails.")
def compress(model, method, mlp_budget, model_budget, group_size, groups, sparsity, init, selection, pruning, nm, calib, images,
             calib_tokens, seq_len, steps, lr, batch_tokens, global_steps, global_lr, delta_rank, layout, keep_first,
             keep_last, global_batch, sequential, refit, refit_rounds, refit_u, refit_ridge, refit_iters, refit_target,
             eval_tokens, device, checkpoint, out, resume, seed, quiet, global_seq_len=None, global_norms=None,
             onload="auto", activation_memory_gb=None, distributed=False, dist_timeout=1800.0, keep_state=False,
             anchor_scale=None, train_scope=None, block_lr=None, residual_init=None, share_attention=None):
    """Compress MODEL and write a checkpoint.

    MODEL: a built-in name (smollm2-135m, minilm-l6), a local Hugging Face folder, a .gguf file, or
    timm:NAME (with --checkpoint). Options marked FiPS: or DeltaLLM: belong to that method; the other
    method refuses them."""
    from .config import DeltaConfig, FipsConfig
    _refuse_other_methods_options(click.get_current_context(silent=True), method)
    out_p = Path(out)
    if out_p.suffix != ".pt":
        raise FipsError(f"--out must name a .pt file (got {out}).")
    if Path(model).exists() and out_p.resolve() == Path(model).resolve():
        raise FipsError("--out would overwrite the input model.")
    from .data import OOD_DATA
    if calib in OOD_DATA:
        raise FipsError(f"--calib {calib}: that text is for evaluation only (out-of-domain check); "
                        "calibrate on 'wiki' or a file.")
    if calib != "wiki" and not Path(calib).is_file():
        raise FipsError(f"Calibration file not found: {calib}")
    if calib != "wiki":
        from .data import read_text_file
        read_text_file(calib)  # empty / malformed file: fail before loading the model
    if method == "fips":
        try:
            n, m = (int(v) for v in nm.split(":"))
        except ValueError:
            raise FipsError(f"--nm must look like N:M, e.g. 2:4 (got {nm!r}).") from None
        group_list = None
        if groups:
            try:
                group_list = tuple(tuple(int(i) for i in g.split(",")) for g in groups.split(";") if g.strip())
            except ValueError:
                raise FipsError(f"--groups must look like '0,1,2;3,4' (got {groups!r}).") from None
        cfg = FipsConfig(mlp_budget=mlp_budget if (mlp_budget or model_budget) else 0.5, model_budget=model_budget,
                         group_size=group_size, groups=group_list, sparsity=sparsity, init=init, pruning=pruning,
                         nm=(n, m), steps=steps, batch_tokens=batch_tokens, global_steps=global_steps,
                         global_lr=global_lr, seed=seed, **{k: v for k, v in dict(lr=lr,
                             global_batch=global_batch, global_seq_len=global_seq_len, global_norms=global_norms,
                             sequential=sequential, refit=refit,
                             refit_rounds=refit_rounds, refit_u=refit_u,
                             refit_ridge=refit_ridge, refit_iters=refit_iters, refit_target=refit_target,
                             selection=selection, activation_memory_gb=activation_memory_gb).items()
                             if v is not None})
    else:
        cfg = DeltaConfig(model_budget=model_budget if (mlp_budget or model_budget) else 0.88, mlp_budget=mlp_budget,
                          delta_rank=delta_rank, keep_first=keep_first, keep_last=keep_last,
                          steps=steps, seed=seed,
                          **{k: v for k, v in dict(lr=lr, layout=layout, anchor_scale=anchor_scale,
                                                   residual_init=residual_init, share_attention=share_attention,
                                                   train_scope=train_scope, block_lr=block_lr).items()
                             if v is not None})
    from .distributed import env_requests_distributed
    distributed = distributed or env_requests_distributed()
    if method == "fips" and _use_onload(model, onload, distributed):
        if eval_tokens:
            raise FipsError("--eval-tokens needs the dense model in memory; with block-by-block onloading evaluate "
                            "the checkpoint afterwards (fips eval OUT.pt), or pass --onload off.")
        run_compress_streamed(model, cfg, out_p, calib=calib, calib_tokens=calib_tokens, seq_len=seq_len,
                              device=device, resume=resume, progress=not quiet, distributed=distributed,
                              dist_timeout=dist_timeout, keep_state=keep_state)
        return
    if distributed:
        raise FipsError("--distributed runs FiPS block by block from a local folder of safetensors "
                        "(a Hugging Face causal LM); this model/method runs in one process.")
    run_compress(model, cfg, out_p, calib=calib, images=images, calib_tokens=calib_tokens, seq_len=seq_len,
                 eval_tokens=eval_tokens, device=device, checkpoint=checkpoint, resume=resume, progress=not quiet,
                 keep_state=keep_state)


ONLOAD_AUTO_BYTES = 2 * 2**30  # auto: block-by-block onloading for folders with more weights than this


def _use_onload(model: str, onload: str, distributed: bool) -> bool:
    from .streamed import WeightFiles, streamable
    if onload == "off":
        return False
    if not streamable(model):
        if onload == "on" or distributed:
            raise FipsError(f"block-by-block onloading reads a local Hugging Face folder with safetensors; "
                            f"{model} is not one.")
        return False
    return onload == "on" or distributed or WeightFiles(Path(model)).total_bytes() > ONLOAD_AUTO_BYTES


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _disk_refusal(need: int, parts: str, where: Path, resume_dir: Path | None = None) -> None:
    """Refuse in one line when ``need`` bytes (less what a resumed state folder already holds) cannot fit
    the free space of ``where``'s file system."""
    from .streamed import disk_free
    free = disk_free(where)
    if free is None:
        return
    held = sum(f.stat().st_size for f in resume_dir.iterdir() if f.is_file()) if resume_dir and resume_dir.is_dir() else 0
    if need - held > free:
        raise FipsError(f"this run needs about {_gib(need - held)} of disk ({parts}) but only {_gib(free)} is free "
                        f"at {where}; free disk space or write --out to another disk.")


@contextlib.contextmanager
def _disk_full_is_one_line(where: Path, state_dir: Path | None, out_p: Path):
    """A write that fails for lack of space (OSError ENOSPC, or torch's zip writer failing mid-file)
    becomes one FipsError line; the half-written temporaries go first (finished groups stay)."""
    from .streamed import disk_free, disk_full, remove_temporaries
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        if state_dir is not None:
            remove_temporaries(state_dir)
        from .tempfiles import remove_stale_temporaries
        try:
            remove_stale_temporaries(out_p)
        except OSError:
            pass
        free = disk_free(where)
        keep = (f"; the finished groups stay in {state_dir}: free space and rerun with --resume"
                if state_dir is not None and state_dir.is_dir() else "; free space and rerun")
        raise FipsError(f"the disk filled up while writing to {where} ({_gib(free) if free is not None else 'unknown'} "
                        f"free now){keep}.") from None


def run_compress_streamed(model: str, cfg, out_p: Path, *, calib="wiki", calib_tokens=16384, seq_len=512,
                          device="auto", resume=False, progress=True, distributed=False,
                          dist_timeout=1800.0, keep_state=False) -> dict | None:
    """FiPS block by block from a safetensors folder (fips_rt.streamed), optionally over torchrun's ranks:
    memory and disk plan (refused up front when it cannot fit MemAvailable / the free disk), compress,
    checkpoint on rank 0, peak RSS and time per phase; a full disk during the run is one error line.
    Returns the summary on rank 0."""
    import os

    from . import distributed as D
    from .api import resolve_device
    from .capture import count_tokens
    from .checkpoint import save_checkpoint_parts
    from .fips import plan_groups
    from .report import size_rows, table
    from .streamed import (PhaseMemory, Skeleton, checkpoint_parts, compress_streamed, mem_available, plan_disk,
                           plan_memory)
    t0 = time.time()
    dev = resolve_device(device)
    ranks = D.init(dist_timeout, dev) if distributed else D.Ranks()
    tag = f"rank {ranks.rank}/{ranks.world}: " if ranks.active else ""
    try:
        mem = PhaseMemory()
        mem.start("load")
        sk = Skeleton(model)
        batches = calibration_for(sk.lm, calib, calib_tokens, seq_len)
        plans, _ = plan_groups(sk.model, sk.adapter, cfg)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)) if ranks.active else 1
        est = plan_memory(sk, plans, cfg, count_tokens(batches, "causal-lm"), local_ranks=local)
        avail = mem_available()
        if avail is not None and est["machine"] > avail:
            raise FipsError(f"this run needs about {_gib(est['machine'])} ({local} process(es): resident weights "
                            f"{_gib(est['resident_weights'])} + one block {_gib(est['block'])} + activations "
                            f"{_gib(est['activations'])} + one group {_gib(est['group_working_set'])}) but only "
                            f"{_gib(avail)} is available; lower --activation-memory-gb, --calib-tokens or "
                            f"--group-size, or use fewer processes.")
        state_dir = out_p.with_name(out_p.name + ".state")
        if resume and not state_dir.is_dir():
            raise FipsError(f"--resume: no interrupted run found at {state_dir}.")
        disk = plan_disk(sk, plans, cfg, count_tokens(batches, "causal-lm"), world=ranks.world)
        _disk_refusal(disk["peak"], f"state folder: activations {_gib(disk['activations'])} + inits "
                      f"{_gib(disk['inits'])}, then packed groups {_gib(disk['packed_groups'])} + checkpoint "
                      f"{_gib(disk['checkpoint'])}", out_p.parent, state_dir if resume else None)
        if ranks.rank == 0:
            _echo(f"{tag}block-by-block onloading of {model}: {len(plans)} groups over {ranks.world} process(es); "
                  f"planned peak {_gib(est['per_process'])} per process (MemAvailable "
                  f"{_gib(avail) if avail is not None else 'unknown'}); disk at its peak {_gib(disk['peak'])}")
        with _disk_full_is_one_line(out_p.parent, state_dir, out_p):
            res = compress_streamed(model, cfg, batches, sk=sk, device=dev, state_dir=state_dir, resume=resume,
                                    progress=progress and ranks.rank == 0, ranks=ranks, log=_echo, mem=mem)
            if res is None:  # a rank other than 0: its groups went to rank 0
                _echo(f"{tag}groups sent to rank 0; peak RSS {_gib(mem.overall)}")
                return None
            mem.start("checkpoint write")
            tensors, structure, counts = checkpoint_parts(res)
            report = {"method": "fips", "config": cfg.to_dict(), "mlp_budget": res["budget"],
                      "groups": [res["infos"].get(p.index, {}) for p in res["plans"]], "global": {},
                      "seconds": res["seconds"], "device": str(dev), "engine": "block-by-block onloading",
                      "world_size": ranks.world, "counts": counts,
                      "calibration": {"data": calib, "tokens": calib_tokens, "seq_len": seq_len}}
            save_checkpoint_parts(out_p, sk.lm, "fips", cfg.to_dict(), tensors, structure, report)
            del tensors
        mem.end()
        if not keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)
        summary = {"model": model, "method": "fips", "seconds_compress": res["seconds"],
                   **{k: v for k, v in counts.items() if k != "groups"}, "checkpoint": str(out_p),
                   "checkpoint_bytes": out_p.stat().st_size, "peak_rss": mem.overall,
                   "planned_peak": est["per_process"], "planned_disk": disk["peak"], "phases": mem.phases,
                   "world_size": ranks.world}
        rows = size_rows(counts)
        rows.append(["checkpoint file", "", f"{out_p.stat().st_size / 2**20:.1f} MiB", ""])
        click.echo(table(rows, ["", "dense", "fips", "ratio"]))
        click.echo("phases: " + ", ".join(f"{k} {v['seconds']:.0f} s / peak {_gib(v['peak_rss'])}"
                                          for k, v in mem.phases.items()))
        click.echo(f"{tag}peak RSS {_gib(mem.overall)} (planned {_gib(est['per_process'])}); "
                   f"wrote {out_p} in {time.time() - t0:.0f} s")
        return summary
    finally:
        D.close(ranks)


def run_compress(model: str, cfg, out_p: Path, *, calib="wiki", images=None, calib_tokens=16384, seq_len=512,
                 eval_tokens=0, eval_split="validation", device="auto", checkpoint=None, resume=False,
                 progress=True, eval_ood: str | None = None, keep_state=False) -> dict:
    """Load -> calibrate -> compress_ -> save -> table. Returns the summary dict."""
    import copy
    from .accounting import count_model
    from .api import compress_
    from .checkpoint import save_checkpoint
    from .models import load_model
    from .report import size_rows, table
    t0 = time.time()
    lm = load_model(model, checkpoint)
    _echo(f"loaded {lm.name} ({lm.adapter.family}, {type(lm.model).__name__}) in {time.time() - t0:.0f} s")
    batches = calibration_for(lm, calib, calib_tokens, seq_len, images=images)
    if cfg.method == "fips":
        _check_memory(lm, cfg, batches)  # before the dense copy and the work: refuse in one line
        _check_disk(lm, cfg, out_p, resume)
    dense = copy.deepcopy(lm) if eval_tokens else None
    state_dir = out_p.with_name(out_p.name + ".state")
    if resume and not state_dir.is_dir():
        raise FipsError(f"--resume: no interrupted run found at {state_dir}.")
    with _disk_full_is_one_line(out_p.parent, state_dir, out_p):
        rep = compress_(lm, cfg, batches, device=device, progress=progress, state_dir=state_dir, resume=resume,
                        log=_echo)
    lm.model.cpu()
    counts = count_model(lm.model, lm.adapter)
    summary = {"model": lm.name, "method": cfg.method, "seconds_compress": rep.details.get("seconds"), **{
        k: v for k, v in counts.items() if k != "groups"}}
    if eval_tokens:
        summary["eval"] = evaluate_pair(dense, lm.model, calib if calib != "wiki" else "wiki", eval_split, eval_tokens,
                                        seq_len, progress)
        if eval_ood:  # a text of another domain, never seen in calibration
            summary["eval_ood"] = dict(evaluate_pair(dense, lm.model, eval_ood, eval_split, eval_tokens, seq_len,
                                                     progress), data=eval_ood)
    report = dict(rep.to_dict(), counts=counts, calibration={"data": calib, "tokens": calib_tokens, "seq_len": seq_len},
                  eval=summary.get("eval"), eval_ood=summary.get("eval_ood"))
    with _disk_full_is_one_line(out_p.parent, state_dir, out_p):
        save_checkpoint(out_p, lm, cfg.method, cfg.to_dict(), report)
    if state_dir.is_dir() and not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    summary["checkpoint"] = str(out_p)
    summary["checkpoint_bytes"] = out_p.stat().st_size
    rows = size_rows(counts)
    rows.append(["checkpoint file", "", f"{out_p.stat().st_size / 2**20:.1f} MiB", ""])
    for key, label in (("eval", calib if calib != "wiki" else "wiki"), ("eval_ood", eval_ood)):
        e = summary.get(key) or {}
        if e.get("ppl") is not None:
            rows.append([f"perplexity {label} {e['split']} ({e['tokens']:,} tokens)", f"{e['ppl_dense']:.2f}",
                         f"{e['ppl']:.2f}", f"{e['ppl_ratio']:.3f}"])
    click.echo(table(rows, ["", "dense", cfg.method, "ratio"]))
    from .procmem import ProcessMemory
    summary["peak_rss"] = ProcessMemory().peak()  # the process's peak so far (VmHWM)
    click.echo(f"peak RSS {_gib(summary['peak_rss'])}; wrote {out_p} in {time.time() - t0:.0f} s")
    return summary


def _check_memory(lm, cfg, batches) -> None:
    """In-memory FiPS: the memory still to come (a dense evaluation copy, calibration activations up to
    activation_memory_gb, every group's init, one group's training, a teacher copy) against
    MemAvailable; refused in one line when it cannot fit."""
    from .capture import count_tokens
    from .fips import plan_groups
    from .streamed import mem_available
    avail = mem_available()
    if avail is None:
        return
    plans, _ = plan_groups(lm.model, lm.adapter, cfg)
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in lm.model.parameters()}.values())
    tokens = count_tokens(batches, lm.kind)
    needs_io = cfg.steps > 0 or cfg.refit != "none"
    io_all = sum(2 * 4 * p.d * tokens * len(p.layers) for p in plans) if needs_io else 0
    act = min(io_all, int(cfg.activation_memory_gb * 2**30))
    inits = sum(p.rank * len(p.linears) * p.d_ff * 5 for p in plans)  # V (fp32) + mask, every group
    train = max(p.rank * len(p.linears) * p.d_ff * 4 for p in plans) * (3 if cfg.steps > 0 else 0)
    teacher = model_bytes if (cfg.global_steps > 0 or (cfg.steps > 0 and cfg.keep_teacher)) else 0
    need = act + inits + train + teacher
    if need > avail:
        hint = " or --onload on (block by block from a safetensors folder)" if lm.kind == "causal-lm" else ""
        raise FipsError(f"this run needs about {_gib(need)} more (activations {_gib(act)}, group inits {_gib(inits)}, "
                        f"training {_gib(train)}, teacher copy {_gib(teacher)}) but only {_gib(avail)} is available; "
                        f"lower --activation-memory-gb or --calib-tokens{hint}.")


def _check_disk(lm, cfg, out_p: Path, resume: bool) -> None:
    """In-memory FiPS: the state folder (every finished group, packed: U + kept V values + bitmask) and
    the checkpoint (the same groups + every other tensor, float32) against the free disk; refused in one
    line when they cannot fit."""
    from .fips import plan_groups
    plans, _ = plan_groups(lm.model, lm.adapter, cfg)
    mlp = {pth + ".weight" for p in plans for pth, _ in p.linears}
    unchanged = sum(t.numel() * 4 for n, t in {id(t): (n, t) for n, t in lm.model.state_dict(keep_vars=True).items()
                                                if n not in mlp}.values())
    packed = sum(int(p.rank * len(p.linears) * p.d_ff * (1 - cfg.sparsity)) * 4 + p.rank * len(p.linears) * p.d_ff // 8
                 + p.d * p.rank * 4 for p in plans)
    state_dir = out_p.with_name(out_p.name + ".state")
    _disk_refusal(2 * packed + unchanged + (1 << 20), f"state folder {_gib(packed)} + checkpoint "
                  f"{_gib(packed + unchanged)}", out_p.parent, state_dir if resume else None)


# ----------------------------------------------------------------------------- eval
@cli.command("eval")
@click.argument("model")
@click.option("--data", default="wiki", show_default=True,
              help="'wiki', 'wordnet' (out-of-domain English: WordNet glosses shipped with timm) or a .txt/.jsonl file.")
@click.option("--split", type=click.Choice(["validation", "test"]), default="validation", show_default=True)
@click.option("--eval-tokens", type=click.IntRange(min=32), default=16384, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=16), default=512, show_default=True)
@click.option("--dense", default=None, help="Dense model to compare a checkpoint with (default: the one recorded).")
@click.option("--no-dense", is_flag=True, help="Skip the dense comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (ppl, ppl_dense, ppl_ratio, ...).")
@click.option("--prepacking", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="ONNX models: onnxruntime weight prepacking (auto: what the export's fips_config.json asks for).")
@click.option("--chunk", type=click.IntRange(min=1), default=None,
              help="ONNX models: score each window through the KV cache this many tokens per call (e.g. 1 or 16: "
                   "the shapes decoding and batched serving run, whose kernels may differ from a whole-window "
                   "call's); default: each window in one call.")
def eval_(model, data, split, eval_tokens, seq_len, dense, no_dense, as_json, prepacking, chunk):
    """Evaluate a model or a checkpoint: perplexity (LMs), embedding cosine (encoders), logit agreement (ViTs).

    A checkpoint is compared with its dense model on the same windows. An exported causal LM (an .onnx
    file or its folder) is evaluated in onnxruntime, without torch, on exactly the windows a checkpoint
    gets; --dense DENSE.onnx adds the dense export on the same windows and the ratio."""
    from .data import OOD_DATA
    if data != "wiki" and data not in OOD_DATA:
        from .data import read_text_file
        read_text_file(data)
    if _is_onnx(model):
        res = _eval_onnx(model, dense if not no_dense else None, data, split, eval_tokens, seq_len, not as_json,
                         prepacking=prepacking, chunk=chunk)
        _print_eval(res, as_json)
        return
    if chunk is not None:
        raise FipsError("--chunk applies to ONNX exports (checkpoints are scored in PyTorch, one call per window).")
    from . import evaluate as E
    lm, is_ckpt = _load_any(model)
    if is_ckpt and not no_dense:
        base = _dense_for(lm.extra["checkpoint_header"], dense)
        res = evaluate_pair(base, lm.model, data, split, eval_tokens, seq_len, progress=not as_json)
    elif lm.kind == "causal-lm":
        batches = calibration_for(lm, data, eval_tokens, seq_len, split=split)
        r = E.perplexity(lm.model, batches, not as_json)
        res = {"split": split, "ppl": r["ppl"], "tokens": r["tokens"], "seq_len": seq_len}
    else:
        raise FipsError("Encoders and ViTs are evaluated against their dense model: pass a checkpoint.")
    res["model"] = model
    _print_eval(res, as_json)


def _print_eval(res: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        from .report import table
        click.echo(table([[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in res.items()], ["metric", "value"]))


def _is_onnx(path: str) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix == ".onnx") or (p.is_dir() and (p / "fips_config.json").is_file())


def _eval_onnx(model: str, dense: str | None, data: str, split: str, tokens: int, seq_len: int,
               progress: bool, prepacking: str = "auto", chunk: int | None = None) -> dict:
    """Perplexity of exported causal LMs in onnxruntime (torch is never imported)."""
    from .runtime import Model
    from .runtime.evaluate import lm_windows, perplexity

    def run(path: str, label: str) -> dict:
        m = Model.load(path, prepacking=prepacking)
        if m.kind != "causal-lm":
            raise FipsError(f"{path} is a {m.kind} model; fips eval computes the perplexity of causal LM exports "
                            f"(for encoders and ViTs, evaluate their checkpoints).")
        wins = lm_windows(m.tokenizer, data, split, tokens, seq_len)

        def tick(k, n):
            if progress:
                click.echo(f"\r{label}: window {k}/{n}", nl=k == n, err=True)
        r = perplexity(m, wins, progress=tick, chunk=chunk)
        return dict(r, kernel=m.info.kernel, prepacking=m.info.prepacking)

    res = {"split": split, "data": data}
    r = run(model, "onnx")
    res.update(ppl=r["ppl"], tokens=r["tokens"], seq_len=r["seq_len"], kernel=r["kernel"], seconds=r["seconds"],
               prepacking=r["prepacking"], chunk=chunk)
    if dense is not None:
        if not _is_onnx(dense):
            raise FipsError(f"--dense for an ONNX model must be the dense export (.onnx or its folder); got {dense}")
        d = run(dense, "dense onnx")
        if d["tokens"] != r["tokens"]:
            raise FipsError("the two exports tokenize the text differently; their perplexities are not comparable")
        res.update(ppl_dense=d["ppl"], ppl_ratio=r["ppl"] / d["ppl"], dense=dense)
    res["model"] = model
    return res


# ----------------------------------------------------------------------------- info
@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (mlp_params_dense, mlp_params, params, bytes...).")
@click.option("--groups", "show_groups", is_flag=True, help="Also list every group.")
def info(checkpoint, as_json, show_groups):
    """Show what a checkpoint holds: method, groups, ranks, parameters and bytes (dense vs compressed).

    For an ONNX export (an .onnx file or its folder): the bytes per part of the file -- embedding,
    attention, MLP (FiPS U, V values, V scales, V mask; dense MLP weights), LM head, norms -- and its
    weight format (fips_config.json)."""
    if _is_onnx(checkpoint):
        _onnx_info(checkpoint, as_json)
        return
    from .accounting import count_model
    from .checkpoint import load_checkpoint
    from .report import human_bytes, size_rows, table
    lm = load_checkpoint(checkpoint)
    h = lm.extra["checkpoint_header"]
    counts = count_model(lm.model, lm.adapter)
    res = {"checkpoint": checkpoint, "method": h["method"], "model": h.get("name"), "family": h.get("family"),
           "format_version": 1, "file_bytes": Path(checkpoint).stat().st_size, "config": h["config"],
           **{k: v for k, v in counts.items()}, "eval": (h.get("report") or {}).get("eval"),
           "versions": h.get("versions")}
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{checkpoint}: {h['method']} checkpoint of {h.get('name')} ({h.get('family')}), "
               f"file {human_bytes(res['file_bytes'])}")
    click.echo(table(size_rows(counts), ["", "dense", h["method"], "ratio"]))
    if show_groups and counts["groups"]:
        rows = [[i, g["linears"], g["rank"], f"{g['u_params']:,}", f"{g['v_nnz']:,}", f"{g['density']:.3f}",
                 human_bytes(g["bytes"])] for i, g in enumerate(counts["groups"])]
        click.echo(table(rows, ["group", "linears", "rank", "U params", "V nnz", "V density", "bytes"]))


def _onnx_info(path: str, as_json: bool) -> None:
    from .exporter.parts import onnx_parts
    from .report import human_bytes, table
    from .runtime.contract import read_contract
    from .runtime.session import resolve_model_path
    onnx_path, folder = resolve_model_path(path)
    res = onnx_parts(onnx_path)
    contract = read_contract(folder)
    if contract is not None:
        res.update(method=contract.method, name=contract.name, format_version=contract.format_version,
                   quantization=contract.quantization.to_json(), session=contract.session.to_json())
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    q = res.get("quantization") or {}
    desc = f"{res.get('method', '?')} export of {res.get('name', '?')}, weights {q.get('weights', '?')}"
    if q.get("block_size"):
        desc += f" (block {q['block_size']}, accuracy level {q['accuracy_level']}, embedding {q['embedding']})"
    click.echo(f"{onnx_path}: {desc}, file {human_bytes(res['file_bytes'])}")
    total = max(1, res["total"])
    rows = [[k, f"{v:,}", human_bytes(v), f"{v / total:.3f}"] for k, v in res["parts"].items() if v]
    rows.append(["mlp (all)", f"{res['mlp_bytes']:,}", human_bytes(res["mlp_bytes"]), f"{res['mlp_bytes'] / total:.3f}"])
    rows.append(["total (initializers)", f"{res['total']:,}", human_bytes(res["total"]), "1.000"])
    click.echo(table(rows, ["part", "bytes", "", "share"]))
    click.echo("nodes: " + ", ".join(f"{k} {v}" for k, v in res["nodes"].items()))


# ----------------------------------------------------------------------------- demo
DEMO = dict(model="smollm2-135m", mlp_budget=0.5, group_size=4, sparsity=0.5315, calib_tokens=16384, seq_len=512,
            steps=0, lr=1e-3, refit="after", eval_tokens=8192, eval_ood="wordnet",
            global_steps=60, global_lr=1e-4, global_batch=1, selection="obs")
# sparsity 0.5315 at MLP budget 0.5 gives rank 576 = d for the groups of 4 (U square: no zero basis columns
# at init) and 542 for the last group of 2; V's kept entries chosen by second-order saliency (selection="obs":
# down_proj weighted by its input's full covariance; validation 2.49x -> 2.06x after the refits); then closed-form refits of V and U in the whitened space
# (FipsConfig's default 2 rounds) instead of AdamW steps; then 60 steps of global distillation (KL to the
# dense logits, one 512-token wiki-train row per step, lr 1e-4: validation 2.49x -> 1.90x). Measured choice: docs/quality.md, benchmarks/results/quality_ablation_cpu.md.


@cli.command()
@click.option("--out", "out", default="fips-demo/model.pt", show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=DEMO["steps"], show_default=True,
              help="Local AdamW steps per group (after the init; the refit follows them).")
@click.option("--eval-tokens", type=click.IntRange(min=512), default=DEMO["eval_tokens"], show_default=True)
@click.option("--global-steps", type=click.IntRange(min=0), default=DEMO["global_steps"], show_default=True,
              help="Global distillation steps after the refit: KL to the dense model's logits on one 512-token "
                   "wiki-train row per step, training U, V and the MLP biases (0: none).")
@click.option("--global-lr", type=click.FloatRange(min=0, min_open=True), default=DEMO["global_lr"],
              show_default=True, help="AdamW learning rate of the global distillation (warm-up, then cosine).")
@click.option("--device", default="auto", show_default=True)
def demo(out, steps, eval_tokens, global_steps, global_lr, device):
    """Compress the real SmolLM2-135M (MLP budget 0.5, groups of 4, rank 576, V 53% sparse, whitened init,
    second-order selection of V's entries, closed-form refits + 60 steps of global distillation to the dense model) on wiki-train text, then compare dense vs FiPS perplexity on the held-out wiki test articles and on out-of-domain
    English (WordNet glosses shipped with timm, test half), 16 windows of 512 tokens each."""
    from .config import FipsConfig
    cfg = FipsConfig(mlp_budget=DEMO["mlp_budget"], group_size=DEMO["group_size"], sparsity=DEMO["sparsity"],
                     steps=steps, lr=DEMO["lr"], refit=DEMO["refit"], global_steps=global_steps,
                     global_lr=global_lr, global_batch=DEMO["global_batch"], selection=DEMO["selection"])
    summary = run_compress(DEMO["model"], cfg, Path(out), calib_tokens=DEMO["calib_tokens"], seq_len=DEMO["seq_len"],
                           eval_tokens=eval_tokens, eval_split="test", device=device, eval_ood=DEMO["eval_ood"])
    summary_path = Path(out).with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2))
    click.echo(f"summary: {summary_path}")


# ----------------------------------------------------------------------------- entry points
def _run(command, args=None) -> None:
    try:
        rv = command.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except FipsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as e:  # a torch-free install running a compression command
        if (e.name or "").split(".")[0] not in COMPRESS_MODULES:
            raise
        click.echo(f"error: {_needs_compress(_command_name(args), e.name)}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


def _command_name(args) -> str | None:
    argv = sys.argv[1:] if args is None else list(args)
    return next((a for a in argv if not a.startswith("-")), None)


def main() -> None:
    _run(cli)


def export_main() -> None:
    """``fips-export``: the same as ``fips export``."""
    try:
        cmd = LazyGroup().get_command(None, "export")
    except FipsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    _run(cmd)


if __name__ == "__main__":  # torchrun -m fips_rt.cli compress ...
    main()
