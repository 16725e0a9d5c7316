"""The in-place batch KV cache of ``fips serve`` (``CausalLM.update_batch``: rows leave and join without a
restack, ``decode_batch`` writes the present outputs into the batch's own buffers) and the exporter's graph
outputs written by their producing nodes (no ``Identity`` copies), on the tiny exported Llama."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from fips_rt.runtime import Model

from test_runtime_helpers import needs_exporter, tiny_lm_dir
from test_serve_batching import _prompts, assert_same_or_near_tie, greedy_alone

pytestmark = needs_exporter


@pytest.fixture(scope="module")
def lm():
    return Model.load(tiny_lm_dir("fips", last_logits_only=True), threads=2)


def _rows(batch) -> list[list[np.ndarray]]:
    return [[np.array(v) for v in batch.row(b).values] for b in range(batch.batch_size)]


def test_update_batch_keeps_each_rows_cache(lm):
    caches = [lm.prefill(p)[1] for p in _prompts(6, seed=3)]
    want = {i: [v.numpy() for v in c.values] for i, c in enumerate(caches)}
    batch, order = lm.update_batch(None, [], caches[:4], max_rows=8)
    assert order == [0, 1, 2, 3]
    # drop the first and a middle row, add two: the last row moves into a freed slot
    batch, order = lm.update_batch(batch, [1, 3], caches[4:], max_rows=8)
    ids = [[0, 1, 2, 3, 4, 5][o] for o in order]  # old rows 0..3, then the joining caches
    assert ids == [3, 1, 4, 5] and batch.batch_size == 4
    for got, i in zip(_rows(batch), ids):
        for g, w in zip(got, want[i]):
            np.testing.assert_array_equal(g, w)
    batch, order = lm.update_batch(batch, [], [], max_rows=8)
    assert batch is None and order == []


def test_update_batch_restacks_when_a_longer_row_joins(lm):
    short, long_ = (lm.prefill(p)[1] for p in _prompts(2, lengths=(3, 20)))
    batch, _ = lm.update_batch(None, [], [short])
    batch, order = lm.update_batch(batch, [0], [long_])
    assert order == [0, 1] and batch.width == 20 and batch.lengths == [3, 20]
    np.testing.assert_array_equal(batch.row(0).values[0], short.values[0].numpy())
    assert not np.any(np.asarray(batch.values[0])[0, :, :17])  # the left padding is zeros


def test_greedy_equals_alone_through_in_place_updates(lm):
    """Rows leave (at different steps) and join (mid-decode) through update_batch; every sequence decodes
    the tokens it decodes alone."""
    prompts = _prompts(6, seed=5)
    n_new = [6, 3, 8, 5, 7, 4]
    alone = [greedy_alone(lm, p, n) for p, n in zip(prompts, n_new)]
    out: dict[int, list[int]] = {}
    active: list[int] = []
    batch = None
    pending = list(range(len(prompts)))
    while pending or active:
        join = []
        if pending and len(active) < 4:
            i = pending.pop(0)
            logits, cache = lm.prefill(prompts[i])
            out[i] = [int(np.argmax(logits))]
            join.append((i, cache))
        keep = [r for r, i in enumerate(active) if len(out[i]) < n_new[i]]
        pool = active + [i for i, _ in join]
        batch, order = lm.update_batch(batch, keep, [c for _, c in join], max_rows=4)
        active = [pool[o] for o in order]
        if not active:
            continue
        logits, batch = lm.decode_batch(batch, [out[i][-1] for i in active])
        for i, lg in zip(active, logits):
            out[i].append(int(np.argmax(lg)))
    for i, (toks, margins) in enumerate(alone):
        assert_same_or_near_tie(out[i][:n_new[i]], toks, margins, f"prompt {i}")


def test_exported_outputs_have_no_identity_copies():
    m = onnx.load(str(tiny_lm_dir("fips", last_logits_only=True) / "model.onnx"), load_external_data=False)
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    assert not any(producers.get(o.name) == "Identity" for o in m.graph.output)
    assert {producers[o.name] for o in m.graph.output if o.name.startswith("present.")} == {"Concat"}


def test_builder_keeps_identity_only_where_an_output_cannot_be_renamed():
    import onnxruntime as ort

    from fips_rt.exporter.builder import GraphBuilder

    b = GraphBuilder()
    x = b.add_input("x", TensorProto.FLOAT, [2])
    y = b.op("Relu", [x])
    z = b.op("Neg", [y])
    b.add_output(y, "y", TensorProto.FLOAT, [2])      # produced by Relu, also consumed by Neg: renamed
    b.add_output(y, "y_again", TensorProto.FLOAT, [2])  # the same value twice: an Identity
    b.add_output(x, "x_out", TensorProto.FLOAT, [2])    # a graph input: an Identity
    b.add_output(z, "z", TensorProto.FLOAT, [2])
    model = b.make_model("t")
    onnx.checker.check_model(model)
    ops = {o: n.op_type for n in model.graph.node for o in n.output}
    assert (ops["y"], ops["y_again"], ops["x_out"], ops["z"]) == ("Relu", "Identity", "Identity", "Neg")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(got[0], [0, 2])
    np.testing.assert_array_equal(got[1], [0, 2])
    np.testing.assert_array_equal(got[2], [-1, 2])
    np.testing.assert_array_equal(got[3], [0, -2])
    assert b.make_model("t").graph.node[0].output[0] == "y"  # make_model can be called again
