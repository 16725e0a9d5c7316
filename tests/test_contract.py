"""The export contract (fips_rt.runtime.contract): what the exporter writes, the runtime reads strictly."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest

from fips_rt.runtime import contract as C
from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir

pytestmark = needs_exporter


@pytest.fixture(scope="module")
def record():
    return json.loads((tiny_lm_dir("fips") / C.CONFIG_FILE).read_text())


def test_written_record_round_trips_exactly(record):
    c = C.ExportContract.from_json(copy.deepcopy(record))
    assert c.kind == C.CAUSAL_LM and c.method == "fips" and c.sparse_op.nodes > 0
    assert c.causal_lm.num_kv_heads == 2 and c.causal_lm.num_attention_heads == 4  # GQA: never the query heads
    assert c.to_json() == record
    assert c.causal_lm.past_key_values.names(3) == ("past_key_values.3.key", "past_key_values.3.value")


def _refused(d, match):
    with pytest.raises(C.ContractError, match=match) as e:
        C.ExportContract.from_json(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", [0, 3, "1", True, None, 1.0, 2.0])
def test_unknown_version_is_refused(record, version):
    d = copy.deepcopy(record)
    d["format_version"] = version  # 1.0, 2.0 and True equal 1 or 2 in Python; the reader wants the integer
    _refused(d, "format_version")


@pytest.mark.parametrize("key", ["kind", "num_kv_heads", "head_dim", "eos_token_ids", "inputs", "sparse_op",
                                 "model_file", "vocab_size", "present"])
def test_missing_key_is_refused_by_name(record, key):
    d = copy.deepcopy(record)
    del d[key]
    _refused(d, f"missing key '{key}'")


@pytest.mark.parametrize("key,value,match", [
    ("kind", "causal_lm", "kind"),              # the old runtime spelling is not a kind
    ("kind", "image_classifier", "kind"),
    ("num_kv_heads", "2", "num_kv_heads must be an integer"),
    ("num_kv_heads", True, "num_kv_heads must be an integer"),
    ("num_kv_heads", 3, "kv_cache_shape"),       # disagrees with the recorded cache shape
    ("vocab_size", 2 ** 70, "out of range"),
    ("model_file", "../../etc/passwd", "plain file name"),
    ("external_data", "/abs/path.data", "plain file name"),
    ("method", "quantum", "method"),
    ("eos_token_ids", [1, 10 ** 6], "eos_token_ids"),
    ("sliding_windows", [4], "sliding_windows"),
    ("past_key_values", {"key": "past.key", "value": "past.{i}.value"}, "exactly once"),
    ("format", "onnx", "format"),
])
def test_wrong_values_are_refused(record, key, value, match):
    d = copy.deepcopy(record)
    d[key] = value
    _refused(d, match)


def test_unknown_keys_and_non_objects_are_refused(record):
    d = copy.deepcopy(record)
    d["num_key_value_heads"] = 4  # a fuzzy-lookup era alias is an unknown key, not a fallback
    _refused(d, "unknown key 'num_key_value_heads'")
    d = copy.deepcopy(record)
    d["sparse_op"]["extra"] = 1
    _refused(d, "unknown key 'sparse_op.extra'")
    for bad in ([], "x", None, 3):
        _refused(bad, "must be an object")


def test_newer_sparse_op_version_is_refused(record):
    d = copy.deepcopy(record)
    d["sparse_op"]["version"] = 9
    _refused(d, "SparseMatMul version 9")


def _copy_export(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_lm_dir("fips"), dst)
    return dst


def test_runtime_refuses_a_bad_contract_in_one_line(tmp_path):
    from fips_rt.runtime import Model
    from fips_rt.runtime.session import FipsRuntimeError
    folder = _copy_export(tmp_path)
    path = folder / C.CONFIG_FILE
    d = json.loads(path.read_text())
    d["format_version"] = 7
    path.write_text(json.dumps(d))
    with pytest.raises(FipsRuntimeError, match="format_version 7") as e:
        Model.load(folder, threads=1, kernel="reference")
    assert "\n" not in str(e.value)
    path.write_text("{not json")
    with pytest.raises(FipsRuntimeError, match="not readable JSON"):
        Model.load(folder, threads=1, kernel="reference")
    # the CLI: one line on stderr, non-zero exit, no traceback
    d["format_version"] = C.FORMAT_VERSION
    del d["head_dim"]
    path.write_text(json.dumps(d))
    p = subprocess.run([sys.executable, "-m", "fips_rt.runtime.cli", "bench", str(folder), "--repetitions", "1",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, env=runtime_env(),
                       timeout=300)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "head_dim" in p.stderr, p.stderr
    assert "missing key 'head_dim'" in json.loads((tmp_path / "r.json").read_text())["compressed"]["error"]


def test_contract_kind_must_match_the_graph(tmp_path):
    from fips_rt.runtime import Model
    from fips_rt.runtime.session import FipsRuntimeError
    folder = _copy_export(tmp_path)
    path = folder / C.CONFIG_FILE
    d = json.loads(path.read_text())
    spec = {k: d.pop(k) for k in C.CausalLMSpec.KEYS}
    d.update(kind="encoder", hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
             num_attention_heads=spec["num_attention_heads"], vocab_size=spec["vocab_size"],
             max_position_embeddings=spec["max_position_embeddings"], pooling="mean",
             embedding_output="sentence_embedding")
    C.ExportContract.from_json(copy.deepcopy(d))  # a valid encoder record ...
    path.write_text(json.dumps(d))
    with pytest.raises(FipsRuntimeError, match="says model.onnx is a encoder model"):
        Model.load(folder, threads=1, kernel="reference")  # ... but not this graph's


def test_a_folder_without_contract_runs_from_the_graph(tmp_path):
    from fips_rt.runtime import Model
    folder = _copy_export(tmp_path)
    (folder / C.CONFIG_FILE).unlink()
    m = Model.load(folder, threads=1, kernel="reference")
    assert m.contract is None and m.kind == C.CAUSAL_LM and m.num_layers == 4
    r = m.generate("w5 w6", max_new_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(r.token_ids) == 3
