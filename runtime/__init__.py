"""fips_rt.runtime: torch-free onnxruntime inference for exported fips-rt models."""


# ---- lazy exports of the runtime API (resolved on first access; nothing here imports torch).
# The function forms generate()/embed()/classify() live in fips_rt.runtime.generate (a package-level
# ``generate`` would be shadowed by the submodule of the same name).
_RUNTIME_LAZY = {
    "Model": "fips_rt.runtime.model",
    "CausalLM": "fips_rt.runtime.model",
    "Encoder": "fips_rt.runtime.model",
    "ImageClassifier": "fips_rt.runtime.model",
    "Tokenizer": "fips_rt.runtime.tokenizer",
    "GenerationResult": "fips_rt.runtime.streaming",
    "GenerationChunk": "fips_rt.runtime.streaming",
    "ExportContract": "fips_rt.runtime.contract",
    "FipsRuntimeError": "fips_rt.runtime.session",
    "load": "fips_rt.runtime.generate",
    "create_session": "fips_rt.runtime.session",
    "run_bench": "fips_rt.runtime.bench",
    "BenchResult": "fips_rt.runtime.bench",
    "ServeConfig": "fips_rt.runtime.serve",
}


def __getattr__(name: str):
    target = _RUNTIME_LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'fips_rt.runtime' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value
