"""``fips export`` / ``fips-export``: parse, call :func:`fips_rt.exporter.export`, print the report table.

Exit status: 0 when the export was written (and, unless --no-verify, parity passed); 1 when parity
failed (the files are still written, for inspection); 2 for a user error (FipsError, one line).
"""
from __future__ import annotations

import json
import sys

import click

from fips_rt.errors import FipsError


WEIGHTS_HELP = ("Weight format. fp32 (default) / fp16: float weights (fp16 computes in fp16, norms and softmax "
                "in fp32). int8 / int4: weight-only quantization, fp32 activations: attention, dense MLPs, the LM "
                "head become com.microsoft.MatMulNBits by onnxruntime.quantization's "
                "MatMulNBitsQuantizer, the embedding GatherBlockQuantized (a tied embedding reads the head's "
                "quantized tensors: one copy), FiPS V fips.QSparseMatMul (int8 / packed int4 values + scales + "
                "bitmask), the FiPS basis products 8-bit MatMulNBits after an exact rescaling (see "
                "--basis-weights). The file "
                "asks the runtime for prepacking (fips_config.json); dense models give the "
                "quantized baselines.")


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_or_checkpoint")
@click.argument("out", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="The .onnx file to write (or give it as the second argument); external data, tokenizer files "
                   "and fips_config.json go beside it.")
@click.option("--weights", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help=WEIGHTS_HELP + "  [default: fp32]")
@click.option("--block-size", type=click.Choice(["32", "128"]), default=None,
              help="int8/int4: MatMulNBits block size (weights per scale along the input axis; smaller: more "
                   "accurate, more scale bytes).  [default: 32]")
@click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "4"]), default=None,
              help="int8/int4: MatMulNBits accuracy_level, the compute type of the quantized products (0: "
                   "unset, 1: fp32, 2: fp16, 4: int8 -- activations quantized per block inside the kernel, the "
                   "fastest on x86).  "
                   "[default: 4]")
@click.option("--basis-weights", type=click.Choice(["int8", "fp32"]), default=None,
              help="int8/int4 FiPS exports: the shared bases U (products x·U and t·Uᵀ). int8: 8-bit MatMulNBits "
                   "in two layouts, after rescaling U's columns against V's rows (exact) so that the activations "
                   "it quantizes per block keep their precision (measured 0.998x the fp32 export's perplexity "
                   "with it, 1.032x without). fp32: one float copy of U, larger and slower to decode.  "
                   "[default: int8]")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Same as --weights fp32/fp16 (kept for older scripts).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 17).")
@click.option("--last-logits-only", is_flag=True, help="Causal LMs: logits for the last position only.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-PyTorch parity check.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights for a timm:NAME model (safetensors or a torch state dict).")
@click.option("--external-data/--no-external-data", default=None,
              help="Force weights into (or out of) <output>.data; default: only above the 2 GB protobuf limit.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of the table.")
def export_command(model_or_checkpoint, out, output, weights, block_size, accuracy_level, basis_weights, dtype, opset,
                   last_logits_only, no_verify, checkpoint, external_data, as_json):
    """Export MODEL_OR_CHECKPOINT (a fips-rt model.pt, or a dense model spec) to ONNX, written to OUT
    (or -o/--output).

    A FiPS or DeltaLLM checkpoint is written compressed (shared U once per group, sparse V as values
    + bitmask behind the fips.SparseMatMul op); a spec (smollm2-135m, minilm-l6, an HF folder, a
    .gguf, timm:NAME) is written dense. --weights int8/int4 quantizes either (causal LMs and encoders).

    \b
    Examples:
      fips export model.pt fips.onnx                      # FiPS, fp32
      fips export model.pt q8/model.onnx --weights int8   # FiPS with int8 V, U and the rest MatMulNBits
      fips export smollm2-135m dense-q4/model.onnx --weights int4 --block-size 32
    """
    from .api import export
    try:
        if out and output and out != output:
            raise FipsError(f"two outputs given ({out} and --output {output}); give one.")
        target = out or output
        if not target:
            raise FipsError("no output given: fips export SRC OUT.onnx (or -o OUT.onnx).")
        report = export(model_or_checkpoint, target, dtype=dtype, opset=opset, last_logits_only=last_logits_only,
                        verify=not no_verify, external_data=external_data, checkpoint=checkpoint,
                        weights=weights, block_size=None if block_size is None else int(block_size),
                        accuracy_level=None if accuracy_level is None else int(accuracy_level),
                        basis_weights=basis_weights, log=lambda msg: click.echo(msg, err=True))
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
