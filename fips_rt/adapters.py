"""Model knowledge as data: one small record per family says where the MLPs are.

A record names the ModuleLists that hold the blocks (Swin: one per stage; groups never cross a
list), the MLP chain inside a block (submodules applied in order: input of the first = MLP input,
output of the last = MLP output), and each MLP linear with its orientation:
``"in"`` = d -> d_ff (gate/up/fc1), ``"out"`` = d_ff -> d (down/fc2).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FipsError


@dataclass(frozen=True)
class Adapter:
    family: str
    kind: str  # "causal-lm" | "encoder" | "vit"
    classes: tuple[str, ...]  # model class names this record matches
    block_lists: tuple[str, ...]  # dotted paths (may contain '*') of ModuleLists of blocks; first that exists
    mlp_chain: tuple[str, ...]  # submodules of a block applied in order: x -> MLP output
    linears: tuple[tuple[str, str], ...]  # (path in block, "in" | "out")
    notes: str = ""
    # linears of a block (paths in the block) whose outputs are added to the residual stream: the attention
    # output and the MLP output projection. DeltaLLM's residual_init="zero" starts their deltas at zero.
    residual_out: tuple[str, ...] = ()


LLAMA_LINEARS = (("mlp.gate_proj", "in"), ("mlp.up_proj", "in"), ("mlp.down_proj", "out"))
LLAMA_RESIDUAL_OUT = ("self_attn.o_proj", "mlp.down_proj")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", "causal-lm",
            ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"),
            ("model.layers",), ("mlp",), LLAMA_LINEARS, "Llama, Qwen2, Mistral, SmolLM (Llama architecture)",
            LLAMA_RESIDUAL_OUT),
    Adapter("gemma2", "causal-lm", ("Gemma2ForCausalLM",), ("model.layers",), ("mlp",), LLAMA_LINEARS,
            "Gemma-2: pre/post feed-forward norms sit outside the MLP and stay dense", LLAMA_RESIDUAL_OUT),
    Adapter("bert", "encoder", ("BertModel", "RobertaModel", "XLMRobertaModel"),
            ("encoder.layer",), ("intermediate", "output.dense"),
            (("intermediate.dense", "in"), ("output.dense", "out")), "BERT-style encoders",
            ("attention.output.dense", "output.dense")),
    Adapter("vit", "vit", ("VisionTransformer", "VisionTransformerDistilled"), ("blocks",), ("mlp",),
            (("mlp.fc1", "in"), ("mlp.fc2", "out")), "timm ViT / DeiT", ("attn.proj", "mlp.fc2")),
    Adapter("swin", "vit", ("SwinTransformer",), ("layers.*.blocks",), ("mlp",),
            (("mlp.fc1", "in"), ("mlp.fc2", "out")), "timm Swin: groups stay within a stage",
            ("attn.proj", "mlp.fc2")),
)


def supported() -> str:
    return "; ".join(f"{a.family} ({', '.join(a.classes)})" for a in ADAPTERS)


def adapter_for(model) -> Adapter:
    name = type(model).__name__
    for a in ADAPTERS:
        if name in a.classes:
            return a
    raise FipsError(f"Unsupported architecture {name}. Supported: {supported()}.")


def adapter_by_family(family: str) -> Adapter:
    for a in ADAPTERS:
        if a.family == family:
            return a
    raise FipsError(f"Unknown model family {family!r}. Supported: {supported()}.")


def _path_parts(path: str) -> list[str]:
    parts = path.split(".") if path else []
    for part in parts:
        if not part or part.startswith("__") or not (part.isidentifier() or part.isdigit()):
            raise FipsError(f"{path!r} is not a module path (bad component {part!r}).")
    return parts


def get_submodule(root, path: str):
    """The submodule at dotted ``path``, walked through the registered children only (``_modules``),
    never through attributes: ``x.__class__`` or a method name is not a path."""
    mod = root
    for part in _path_parts(path):
        children = getattr(mod, "_modules", None)
        if children is None or part not in children or children[part] is None:
            raise FipsError(f"{path!r} names no submodule of {type(root).__name__} (no {part!r}).")
        mod = children[part]
    return mod


def set_submodule(root, path: str, new) -> None:
    """Replace the registered submodule at ``path`` (it must exist) with the module ``new``."""
    parts = _path_parts(path)
    if not parts:
        raise FipsError("the model itself cannot be replaced as a submodule.")
    owner = get_submodule(root, ".".join(parts[:-1]))
    get_submodule(owner, parts[-1])  # must exist: only registered children are replaced
    owner.add_module(parts[-1], new)


def has_submodule(root, path: str) -> bool:
    try:
        get_submodule(root, path)
    except FipsError:
        return False
    return True


def _expand(root, pattern: str) -> list[str]:
    paths = [""]
    for part in pattern.split("."):
        nxt = []
        for p in paths:
            if not has_submodule(root, p):
                continue
            mod = get_submodule(root, p)
            if part == "*":
                nxt += [f"{p}.{name}".lstrip(".") for name in mod._modules]
            elif part in mod._modules:
                nxt.append(f"{p}.{part}".lstrip("."))
        paths = nxt
    return paths


def block_paths(model, adapter: Adapter) -> list[list[str]]:
    """Dotted paths of the blocks, one list per ModuleList (stage). Layer indices run across lists."""
    for pattern in adapter.block_lists:
        lists = _expand(model, pattern)
        if lists:
            return [[f"{lp}.{i}" for i in range(len(get_submodule(model, lp)))] for lp in lists]
    raise FipsError(f"Could not find the blocks of this {adapter.family} model (looked for {adapter.block_lists}).")


def linear_paths(model, adapter: Adapter) -> list[list[tuple[str, str]]]:
    """Per layer (flat index over all stages): [(full path of linear, orientation), ...]."""
    out = []
    for stage in block_paths(model, adapter):
        for bp in stage:
            out.append([(f"{bp}.{lp}", o) for lp, o in adapter.linears])
    return out


def stage_of_layer(model, adapter: Adapter) -> list[int]:
    return [si for si, stage in enumerate(block_paths(model, adapter)) for _ in stage]


