"""Plain-text tables and number formatting for the CLI (no dependencies)."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[list], headers: list[str]) -> str:
    """A GitHub-markdown table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def size_rows(counts: dict) -> list[list]:
    return [
        ["MLP parameters", f"{counts['mlp_params_dense']:,}", f"{counts['mlp_params']:,}", f"{counts['mlp_ratio']:.3f}"],
        ["model parameters", f"{counts['params_dense']:,}", f"{counts['params']:,}", f"{counts['params_ratio']:.3f}"],
        ["MLP bytes (fp32)", human_bytes(counts["mlp_bytes_dense"]), human_bytes(counts["mlp_bytes"]),
         f"{counts['mlp_bytes'] / counts['mlp_bytes_dense']:.3f}"],
        ["model bytes (fp32)", human_bytes(counts["bytes_dense"]), human_bytes(counts["bytes"]), f"{counts['bytes_ratio']:.3f}"],
    ]
