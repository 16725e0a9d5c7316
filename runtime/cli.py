"""Click commands of the torch-free runtime: ``bench_command`` (``fips bench``) and ``serve_command`` (``fips serve``).

The lead mounts them on the main ``fips`` group; ``python -m fips_rt.runtime.cli bench|serve ...`` runs them
standalone. Nothing here imports torch or transformers.
"""
from __future__ import annotations

import sys

import click

KERNEL_CHOICE = click.Choice(["auto", "native", "reference"])
PREPACKING_CHOICE = click.Choice(["auto", "on", "off"])
PREPACKING_HELP = ("onnxruntime weight prepacking (auto: what the export's fips_config.json asks for -- on for "
                   "--weights int8/int4 files, whose MatMulNBits kernels need it, off for float files, where it "
                   "doubles weight RAM; on/off: override).")


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
@click.option("--prepacking", type=PREPACKING_CHOICE, default="auto", show_default=True,
              help=PREPACKING_HELP + " Applied to each model; the report lists the options each side ran with.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Alternate the models this many times, each in a fresh process, pooling the samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompts.")
@click.option("--timeout", default=3600.0, show_default=True, type=float, help="Seconds per model process.")
def bench_command(model, baseline, json_path, markdown_path, plot_path, prompt_lengths, decode_tokens,
                  decode_context, repetitions, warmup, threads, kernel, spinning, prefill_chunk, prepacking, rounds,
                  seed, timeout):
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
                       rounds=rounds, timeout=timeout, log=log, prepacking=prepacking)
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
@click.option("--spinning", type=click.Choice(["off", "on", "auto"]), default="auto", show_default=True,
              help="onnxruntime intra-op thread spinning (auto: the runtime's default, on).")
@click.option("--prepacking", type=PREPACKING_CHOICE, default="auto", show_default=True, help=PREPACKING_HELP)
@click.option("--name", default=None, help="Model id reported by /v1/models (default: from fips_config.json "
                                           "or the folder name).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1024, 1 << 30))
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1, 1 << 24),
              help="Longest accepted prompt (default: the model's context - 1).")
@click.option("--max-tokens-limit", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Largest accepted max_tokens.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Sequences decoded together in one session call (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 1 << 20),
              help="Sequences waiting for a batch slot; beyond it requests get 503 with Retry-After.")
@click.option("--kv-cache-mib", default=2048.0, show_default=True, type=click.FloatRange(0, 1 << 30),
              help="Bound of the batch's KV cache (rows x the widest row's prompt + max_tokens); 0: none.")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(0, 1 << 20),
              help="Prompt tokens per scheduler step; longer prompts run in chunks between decode steps "
                   "(0: whole prompts).")
@click.option("--body-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds for a request body to arrive (then 408).")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds for a request's headers to arrive (then the connection is closed).")
@click.option("--keep-alive", "keep_alive", default=5.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--shutdown-timeout", default=25.0, show_default=True, type=click.FloatRange(0, 3600),
              help="SIGTERM/SIGINT: seconds in-flight requests may still run; then they end with an error event.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Open connections (and tasks) beyond which uvicorn answers 503.")
@click.option("--flush-wait-ms", default=3.0, show_default=True, type=click.FloatRange(0, 1000),
              help="After each step, wait at most this long for its tokens to be sent before the next step, so "
                   "that the HTTP writes do not compete with onnxruntime's threads during the next call (0: do "
                   "not wait; measured on a 2-core machine: one client's inter-token gap 146 ms with 3 against "
                   "172 ms with 0 under load, 16 clients unchanged).")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve_command(model, host, port, threads, kernel, provider, spinning, prepacking, name, max_body_bytes,
                  max_prompt_tokens,
                  max_tokens_limit, max_batch, max_queue, kv_cache_mib, prefill_chunk, body_timeout, header_timeout,
                  keep_alive, shutdown_timeout, max_connections, flush_wait_ms, quiet):
    """Serve MODEL over an OpenAI-style HTTP API (/v1/completions, /v1/chat/completions, /v1/embeddings,
    /v1/models, /health, /metrics, /openapi.json) until SIGINT/SIGTERM. Concurrent generation requests are
    decoded together (continuous batching, up to --max-batch sequences per step)."""
    from .generate import FipsRuntimeError, Model
    from .serve import ServeConfig, serve

    try:
        m = Model.load(model, threads=threads, kernel=kernel, provider=provider, name=name,
                       spinning={"on": True, "off": False}.get(spinning), prefill_chunk=prefill_chunk or None,
                       prepacking=prepacking)
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))
    cfg = ServeConfig(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                      max_tokens_limit=max_tokens_limit, max_batch=max_batch, max_queue=max_queue,
                      kv_cache_mib=kv_cache_mib or None, prefill_chunk=prefill_chunk or None,
                      body_timeout=body_timeout, header_timeout=header_timeout, keep_alive_timeout=keep_alive,
                      shutdown_timeout=shutdown_timeout, max_connections=max_connections,
                      flush_wait_s=flush_wait_ms / 1000.0, log=not quiet)

    def ready(address):
        h, p = address[:2]
        shown = f"[{h}]" if ":" in h else h
        click.echo(f"fips serve: {m.name} ({m.kind}, kernel {m.info.kernel}, {m.info.provider}, "
                   f"{m.info.threads} threads, batch <= {max_batch}) listening on http://{shown}:{p}", err=False)
        sys.stdout.flush()

    try:
        serve(m, host, port, cfg, on_ready=ready)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e}")
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))
    click.echo("fips serve: stopped", err=True)


def _sampling_options(f):
    """The options of ``fips generate`` and ``fips chat`` (the server's request fields, as flags)."""
    opts = [
        click.option("--max-tokens", "-n", default=128, show_default=True, type=click.IntRange(0, 1 << 20),
                     help="Most tokens to generate."),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 100.0),
                     help="0: greedy (deterministic); > 0: sampling."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(0, 1 << 20),
                     help="Sample from the k most likely tokens (0: all)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
                     help="Nucleus sampling: the smallest set of tokens whose probability reaches p."),
        click.option("--seed", default=None, type=int, help="Seed of the sampler (same seed, same text)."),
        click.option("--stop", multiple=True, help="Stop at this string (repeatable; not included in the output)."),
        click.option("--threads", "-t", default=None, type=click.IntRange(1, 4096), help="intra-op threads."),
        click.option("--kernel", type=KERNEL_CHOICE, default="auto", show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load_lm(model, threads, kernel):
    from .model import Model
    from .session import FipsRuntimeError
    try:
        m = Model.load(model, threads=threads, kernel=kernel)
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))
    if m.kind != "causal-lm":
        raise click.ClickException(f"{model} is a {m.kind} model; fips generate and fips chat need a causal LM export")
    return m


@click.command("generate")
@click.argument("model", type=click.Path(exists=True))
@click.option("--prompt", "-p", required=True, help="The prompt ('-': read it from standard input).")
@_sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (text, tokens, timings).")
def generate_command(model, prompt, max_tokens, temperature, top_k, top_p, seed, stop, threads, kernel, ignore_eos,
                     as_json):
    """Complete a prompt with an exported causal LM (.onnx file or folder), streaming the text to stdout."""
    import json

    from .session import FipsRuntimeError
    if prompt == "-":
        prompt = sys.stdin.read()
    m = _load_lm(model, threads, kernel)
    opts = dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop=list(stop), ignore_eos=ignore_eos)
    try:
        if as_json:
            r = m.generate(prompt, **opts)
            click.echo(json.dumps(dict(r.to_dict(), model=m.name, kernel=m.info.kernel), indent=2))
            return
        for chunk in m.stream(prompt, **opts):
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo()
    except FipsRuntimeError as e:
        raise click.ClickException(str(e))


@click.command("chat")
@click.argument("model", type=click.Path(exists=True))
@click.option("--system", default=None, help="A system message put before the conversation.")
@_sampling_options
def chat_command(model, system, max_tokens, temperature, top_k, top_p, seed, stop, threads, kernel):
    """Chat with an exported causal LM from the terminal, through its chat template.

    Each line read from standard input is a user turn; the reply streams back. '/reset' starts a new
    conversation, '/exit' (or end of input, Ctrl-D) leaves."""
    from .session import FipsRuntimeError
    m = _load_lm(model, threads, kernel)
    if not m.tokenizer.chat_template:
        raise click.ClickException(f"{m.name} has no chat template; use 'fips generate' for plain completions")
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        click.echo(f"fips chat: {m.name} ({m.info.kernel} kernel). /reset: new conversation, /exit or Ctrl-D: quit.",
                   err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        parts = []
        try:
            for chunk in m.chat_stream(messages, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, stop=list(stop)):
                parts.append(chunk.text)
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
        except FipsRuntimeError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            click.echo(f"\nerror: {e}", err=True)
            continue
        click.echo()
        messages.append({"role": "assistant", "content": "".join(parts)})


@click.group()
def main():
    """fips-rt runtime commands (torch-free)."""


main.add_command(bench_command)
main.add_command(serve_command)
main.add_command(generate_command)
main.add_command(chat_command)

if __name__ == "__main__":
    main()
