"""``fips export`` / ``fips-export``: parse, call :func:`fips_rt.exporter.export`, print the report table.

Exit status: 0 when the export was written (and, unless --no-verify, parity passed); 1 when parity
failed (the files are still written, for inspection); 2 for a user error (FipsError, one line).
"""
from __future__ import annotations

import json
import sys

import click

from fips_rt.errors import FipsError


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_or_checkpoint")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write; external data, tokenizer files and fips_config.json go beside it.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and compute type (fp16 keeps norms and softmax in fp32).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 17).")
@click.option("--last-logits-only", is_flag=True, help="Causal LMs: logits for the last position only.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-PyTorch parity check.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights for a timm:NAME model (safetensors or a torch state dict).")
@click.option("--external-data/--no-external-data", default=None,
              help="Force weights into (or out of) <output>.data; default: only above the 2 GB protobuf limit.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of the table.")
def export_command(model_or_checkpoint, output, dtype, opset, last_logits_only, no_verify, checkpoint,
                   external_data, as_json):
    """Export MODEL_OR_CHECKPOINT (a fips-rt model.pt, or a dense model spec) to ONNX.

    A FiPS or DeltaLLM checkpoint is written compressed (shared U once per group, sparse V as values
    + bitmask behind the fips.SparseMatMul op); a spec (smollm2-135m, minilm-l6, an HF folder, a
    .gguf, timm:NAME) is written dense.
    """
    from .api import export
    try:
        report = export(model_or_checkpoint, output, dtype=dtype, opset=opset, last_logits_only=last_logits_only,
                        verify=not no_verify, external_data=external_data, checkpoint=checkpoint,
                        log=lambda msg: click.echo(msg, err=True))
    except FipsError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    click.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.table())
    if report.verified and not report.passed:
        sys.exit(1)


def main(argv=None) -> None:  # pragma: no cover - thin entry for `python -m fips_rt.exporter.cli`
    export_command.main(args=argv, prog_name="fips-export")


if __name__ == "__main__":  # pragma: no cover
    main()
