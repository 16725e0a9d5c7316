"""Runtime unit tests that need no exported model: sampling, detokenization with stop strings, tokenizer
files and chat templates, the torch-free import guarantee, session helpers."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fips_rt.runtime.generate import ChatTemplate, Tokenizer, _TextStream, sample_next_token
from fips_rt.runtime.session import FipsRuntimeError, external_data_files, model_file_bytes, resolve_model_path

from test_runtime_helpers import smollm2_tokenizer_dir


# ----------------------------------------------------------------------------- torch-free
def test_runtime_imports_do_not_import_torch():
    code = (
        "import sys\n"
        "import fips_rt\n"
        "import fips_rt.runtime\n"
        "from fips_rt.runtime import generate, bench, serve, session, cli\n"
        "from fips_rt.runtime.generate import Model, generate as g\n"
        "from fips_rt.runtime.bench import run_bench, BenchResult\n"
        "from fips_rt.runtime.cli import bench_command, serve_command\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'timm', 'matplotlib'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- sampling
def test_greedy_is_argmax_first_on_ties():
    logits = np.array([0.0, 3.0, 3.0, -1.0], dtype=np.float32)
    assert sample_next_token(logits) == 1
    assert sample_next_token(logits, temperature=0.0, top_k=3, top_p=0.5) == 1
    assert sample_next_token(logits, temperature=1.0, top_k=1) == 1


def test_sampling_is_reproducible_with_a_seed():
    rng_logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [sample_next_token(rng_logits, temperature=0.9, top_k=50, top_p=0.95, rng=rng) for _ in range(50)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_restricts_to_the_k_largest():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    seen = {sample_next_token(logits, temperature=5.0, top_k=2, rng=rng) for _ in range(400)}
    assert seen == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p)
    rng = np.random.default_rng(0)
    seen = {sample_next_token(logits, temperature=1.0, top_p=0.7, rng=rng) for _ in range(400)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.8
    seen = {sample_next_token(logits, temperature=1.0, top_p=0.5, rng=rng) for _ in range(100)}
    assert seen == {0}  # exactly reaching top_p with one token
    seen = {sample_next_token(logits, temperature=1.0, top_p=1e-6, rng=rng) for _ in range(50)}
    assert seen == {0}  # the most likely token is always kept


def test_sampling_frequencies_follow_softmax():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    rng = np.random.default_rng(123)
    n = 20000
    counts = np.bincount([sample_next_token(logits, temperature=1.0, rng=rng) for _ in range(n)], minlength=3)
    assert np.allclose(counts / n, [0.6, 0.3, 0.1], atol=0.02)
    # temperature sharpens: T=0.5 squares the ratios
    counts = np.bincount([sample_next_token(logits, temperature=0.5, rng=rng) for _ in range(n)], minlength=3)
    expect = np.array([0.36, 0.09, 0.01]) / 0.46
    assert np.allclose(counts / n, expect, atol=0.02)


def test_sampling_ignores_non_finite_logits():
    logits = np.array([np.nan, 1.0, -np.inf, 0.5])
    rng = np.random.default_rng(0)
    seen = {sample_next_token(logits, temperature=1.0, rng=rng) for _ in range(200)}
    assert seen <= {1, 3}


# ----------------------------------------------------------------------------- tokenizer and chat template
@pytest.fixture(scope="module")
def tok():
    return Tokenizer(smollm2_tokenizer_dir())


def test_tokenizer_files(tok):
    assert tok.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>"
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids
    ids = tok.encode("Hello world, héllo ☃!")
    assert tok.decode(ids) == "Hello world, héllo ☃!"
    assert tok.chat_template and "im_start" in tok.chat_template


def test_tokenizer_reads_configs_defensively(tmp_path, tok):
    # tokenizer.json only + odd configs: no crash, eos ids given by the export contract
    (tmp_path / "tokenizer.json").write_bytes((smollm2_tokenizer_dir() / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|endoftext|>", "special": True}, "model_max_length": 1e30,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ messages[0]['content'] }}!"}]}))
    (tmp_path / "special_tokens_map.json").write_text("not json")
    t = Tokenizer(tmp_path, eos_token_ids=(2, 7))
    assert t.eos_token == "<|endoftext|>"
    assert {2, 7, t.token_to_id("<|endoftext|>")} <= set(t.eos_token_ids)
    assert t.model_max_length is None
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    # no chat template at all -> a clear error
    (tmp_path / "tokenizer_config.json").write_text("{}")
    t = Tokenizer(tmp_path)
    with pytest.raises(FipsRuntimeError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    # chat_template.jinja beside the files is found
    (tmp_path / "chat_template.jinja").write_text("<{{ messages|length }}>")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "<1>"


def test_tokenizer_ignores_saved_padding_and_truncation(tmp_path):
    data = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text())
    data["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 2,
                       "pad_type_id": 0, "pad_token": "<|im_end|>"}
    data["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    t = Tokenizer(tmp_path)
    encs = t.encode_batch(["a", "one two three four"])
    assert len(encs[0].ids) == 1 and len(encs[1].ids) == 4


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FipsRuntimeError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_chat_template_matches_transformers(tok):
    from test_runtime_helpers import hf_tokenizer
    hf = hf_tokenizer()
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    ):
        for agp in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=agp)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False)
            assert ours == theirs


def test_chat_template_is_sandboxed_and_reports_errors():
    t = ChatTemplate("{{ raise_exception('bad role') }}")
    with pytest.raises(FipsRuntimeError, match="bad role"):
        t.render([])
    t = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(FipsRuntimeError):
        t.render([])
    t = ChatTemplate("{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                     "{{ m.content }}{% endfor %}")
    assert t.render([{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]) == \
        '[{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]é'
    with pytest.raises(FipsRuntimeError, match="invalid chat template"):
        ChatTemplate("{% for %}")


# ----------------------------------------------------------------------------- incremental text + stop strings
def _stream_all(tok, ids, stop, prompt=()):
    s = _TextStream(tok, list(prompt), stop)
    parts = []
    for i in ids:
        parts.append(s.push(i))
        if s.stopped:
            break
    parts.append(s.flush())
    return parts, s


def test_text_stream_reassembles_the_decoded_text(tok):
    text = "Zürich — 東京 and 🙂 emoji, plus ordinary words."
    ids = tok.encode(text)
    parts, s = _stream_all(tok, ids, [])
    assert "".join(parts) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)  # partial UTF-8 sequences are held back


def test_text_stream_stops_at_stop_strings(tok):
    ids = tok.encode("one two three four five")
    parts, s = _stream_all(tok, ids, ["three"])
    assert s.stopped
    assert "".join(parts) == "one two "
    parts, s = _stream_all(tok, ids, ["zzz", "four f"])
    assert "".join(parts) == "one two three "
    parts, s = _stream_all(tok, ids, ["nope"])
    assert not s.stopped and "".join(parts) == "one two three four five"


def test_text_stream_holds_back_possible_stop_prefixes(tok):
    ids = tok.encode("abc END")
    s = _TextStream(tok, [], ["ENDX"])
    released = "".join(s.push(i) for i in ids)
    assert not released.endswith("END")  # could still become "ENDX"
    assert released + s.flush() == "abc END"


def test_text_stream_keeps_leading_space_with_prompt_context(tok):
    prompt = tok.encode("Hello")
    cont = tok.encode(" world")
    parts, _ = _stream_all(tok, cont, [], prompt=prompt)
    assert "".join(parts) == " world"


# ----------------------------------------------------------------------------- helpers
def test_text_stream_work_per_token_does_not_grow_with_position(tok):
    # 2,000 streamed tokens: what each push looks at stays bounded (the old stream re-decoded the whole
    # output at every token, so its work grew linearly with the position)
    words = ("alpha", "beta", "Zürich", "東京", "🙂", "gamma", "delta,", "epsilon.")
    ids = tok.encode(" ".join(words[i % len(words)] for i in range(1200)))[:2000]
    assert len(ids) == 2000
    s = _TextStream(tok, tok.encode("Once"), ["STOPWORD", "\n\nUser:"])
    work, parts = [], []
    for i in ids:
        parts.append(s.push(i))
        work.append(s.work)
    parts.append(s.flush())
    assert "".join(parts) == tok.decode(ids)
    assert max(work[1000:]) <= max(work[:100]) + 16
    assert sum(work) < 40 * len(ids)


def test_resolve_model_path_and_sizes(tmp_path):
    with pytest.raises(FipsRuntimeError, match="not found"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(FipsRuntimeError, match="No .onnx"):
        resolve_model_path(tmp_path)
    (tmp_path / "a.onnx").write_bytes(b"x" * 10)
    assert resolve_model_path(tmp_path)[0] == tmp_path / "a.onnx"
    (tmp_path / "b.onnx").write_bytes(b"y")
    with pytest.raises(FipsRuntimeError, match="Several"):
        resolve_model_path(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"z" * 3)
    assert resolve_model_path(tmp_path) == (tmp_path / "model.onnx", tmp_path)


def test_model_file_bytes_counts_external_data(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    files = external_data_files(path)
    assert [f.name for f in files] == ["weights.bin"]
    assert model_file_bytes(path) == path.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    assert model_file_bytes(path) > 64 * 64 * 4


def test_cuda_sessions_never_register_the_cpu_kernel(monkeypatch):
    from fips_rt.runtime import native, session

    def boom(*a, **k):
        raise AssertionError("native.register called for a CUDA session")

    monkeypatch.setattr(native, "register", boom)
    so, facts = session.session_options(provider="cuda", kernel="auto", threads=1)
    assert facts["kernel"] == "reference"
    with pytest.raises(FipsRuntimeError, match="never registered in a CUDA session"):
        session.session_options(provider="cuda", kernel="native")


def test_session_options(monkeypatch):
    from fips_rt.runtime import native, session
    calls = []
    monkeypatch.setattr(native, "register", lambda so, kernel="auto": calls.append(kernel) or "native")
    so, facts = session.session_options(threads=3, kernel="auto")
    assert calls == ["auto"] and facts["kernel"] == "native"
    assert so.intra_op_num_threads == 3 and not so.enable_mem_pattern
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    assert facts["spinning"] is True  # onnxruntime's default: the kernel runs on its pool
    assert "session.intra_op.allow_spinning" not in facts["config_entries"]
    so, facts = session.session_options(kernel="reference", spinning=False)
    assert facts["kernel"] == "reference" and facts["spinning"] is False and calls == ["auto"]
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # the native kernel unavailable: auto falls back, native raises
    monkeypatch.setattr(native, "register", lambda so, kernel="auto": (_ for _ in ()).throw(RuntimeError("no cc")))
    assert session.session_options(kernel="auto")[1]["kernel"] == "reference"
    with pytest.raises(FipsRuntimeError, match="no cc"):
        session.session_options(kernel="native")
    with pytest.raises(FipsRuntimeError, match="kernel must be"):
        session.session_options(kernel="fast")
