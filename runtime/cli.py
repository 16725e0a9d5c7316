"""Click commands of the torch-free runtime: ``bench_command`` (``fips bench``) and ``serve_command`` (``fips serve``).

The lead mounts them on the main ``fips`` group; ``python -m fips_rt.runtime.cli bench|serve ...`` runs them
standalone. Nothing here imports torch or transformers.
"""
from __future__ import annotations

import sys

import click

KERNEL_CHOICE = click.Choice(["auto", "native", "reference"])


def _lengths(ctx, param, value: str) -> list[int]:
    try:
        xs = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not xs or any(x < 1 for x in xs):
        raise click.BadParameter("lengths must be integers >= 1")
    return xs


@click.command("bench")
@click.argument("model", type=click.Path(exists=True))
@click.option("--baseline", type=click.Path(exists=True), default=None,
              help="A second model (e.g. the dense export) measured the same way; ratios are MODEL / BASELINE.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full result.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG summary (needs matplotlib).")
@click.option("--prompt-lengths", default="1,64,512", show_default=True, callback=_lengths,
              help="Prefill lengths (tokens), comma-separated.")
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(0, 100000),
              help="Tokens decoded per repetition (0: no decode benchmark).")
@click.option("--decode-context", default=64, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Prompt length before decoding.")
@click.option("--repetitions", "-r", default=5, show_default=True, type=click.IntRange(1, 100000))
@click.option("--warmup", "-w", default=1, show_default=True, type=click.IntRange(0, 100000))
@click.option("--threads", "-t", default=None, type=click.IntRange(1, 4096),
              help="intra-op threads (default: usable CPU cores); the same for both models.")
@click.option("--kernel", type=KERNEL_CHOICE, default="auto", show_default=True,
              help="fips.SparseMatMul implementation (native kernel library or the ONNX function bodies).")
@click.option("--spinning", type=click.Choice(["off", "on", "auto"]), default="on", show_default=True,
              help="onnxruntime intra-op thread spinning, identical for both models (on: onnxruntime's "
                   "default, lowest latency; off: idle threads sleep, less CPU burnt; auto: the "
                   "runtime's default, which is on).")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(0, 1 << 20),
              help="Prompts longer than this run in chunks through the KV cache (0: never chunk).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Alternate the models this many times, each in a fresh process, pooling the samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompts.")
@click.option("--timeout", default=3600.0, show_default=True, type=float, help="Seconds per model process.")
def bench_command(model, baseline, json_path, markdown_path, plot_path, prompt_lengths, decode_tokens,
                  decode_context, repetitions, warmup, threads, kernel, spinning, prefill_chunk, rounds, seed, timeout):
    """Benchmark MODEL (.onnx file or exported folder), optionally against --baseline, each in a fresh process.

    Reports load time, memory attributable to the model (RSS after load / after running / peak, minus the
    RSS before the session), file size incl. external data, prefill latency per prompt length, decode
    latency per token (p50/p95) and tokens/s. Exits non-zero when a measurement fails.
    """
    from .bench import run_bench, to_markdown, write_reports

    def log(msg):
        click.echo(msg, err=True)

    result = run_bench(model, baseline, prompt_lengths=prompt_lengths, decode_tokens=decode_tokens,
                       decode_context=decode_context, repetitions=repetitions, warmup=warmup, threads=threads,
                       kernel=kernel, spinning=spinning, prefill_chunk=prefill_chunk or None, seed=seed,
                       rounds=rounds, timeout=timeout, log=log)
    try:
        write_reports(result, json_path=json_path, markdown_path=markdown_path,
                      plot_path=plot_path if result.ok else None)
    except Exception as e:
        click.echo(to_markdown(result))
        raise click.ClickException(f"writing the reports failed: {e}")
    click.echo(to_markdown(result))
    if plot_path and not result.ok:
        click.echo("no plot written: a benchmark failed", err=True)
    if not result.ok:
        for m in (result.compressed, result.baseline):
            if m is not None and not m.ok:
                click.echo(f"error: {m.role} ({m.path}) failed:\n{m.error}", err=True)
        sys.exit(1)


@click.command("serve")
@click.argument("model", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (only this one; 0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: pick a free one; the address is printed).")
@click.option("--threads", "-t", default=None, type=click.IntRange(1, 4096), help="intra-op threads.")
@click.option("--kernel", type=KERNEL_CHOICE, default="auto", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--name", default=None, help="Model id reported by /v1/models (default: from fips_config.json "
                                           "or the folder name).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1024, 1 << 30))
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1, 1 << 24),
              help="Longest accepted prompt (default: the model's context - 1).")
@click.option("--max-tokens-limit", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Largest accepted max_tokens.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Requests running in the model at once (the rest wait).")
@click.option("--workers", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Connection-handling threads.")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(0, 1 << 20),
              help="Prompts longer than this run in chunks through the KV cache (0: never chunk).")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve_command(model, host, port, threads, kernel, provider, name, max_body_bytes, max_prompt_tokens,
                  max_tokens_limit, concurrency, workers, prefill_chunk, quiet):
    """Serve MODEL over an OpenAI-style HTTP API (/v1/completions, /v1/chat/completions, /v1/embeddings,
    /v1/models, /health) until SIGINT/SIGTERM."""
    from .generate import FipsRuntimeError, Model
    from .serve import ServeConfig, serve

    try:
        m = Model.load(model, threads=threads, kernel=kernel, provider=provider, name=name,
                       prefill_chunk=prefill_chunk or None)
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))
    cfg = ServeConfig(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                      max_tokens_limit=max_tokens_limit, concurrency=concurrency, workers=workers, log=not quiet)

    def ready(server):
        h, p = server.server_address[:2]
        shown = f"[{h}]" if ":" in h else h
        click.echo(f"fips serve: {m.name} ({m.kind}, kernel {m.info.kernel}, {m.info.provider}, "
                   f"{m.info.threads} threads) listening on http://{shown}:{p}", err=False)
        sys.stdout.flush()

    try:
        serve(m, host, port, cfg, on_ready=ready)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e}")
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))
    click.echo("fips serve: stopped", err=True)


@click.group()
def main():
    """fips-rt runtime commands (torch-free)."""


main.add_command(bench_command)
main.add_command(serve_command)

if __name__ == "__main__":
    main()
