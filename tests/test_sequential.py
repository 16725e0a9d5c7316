"""Sequential calibration (FipsConfig.sequential): on a tiny model it changes the inputs of a group's
local fit, never its targets; and it runs end to end with the refits."""
import torch

from fips_rt.adapters import linear_paths
from fips_rt.capture import input_statistics, teacher_io
from fips_rt.config import FipsConfig
from fips_rt.fips import compress_fips, init_group, install_group, local_io, plan_groups
from fips_rt.sparsity import global_magnitude_masks
from fips_rt.testing import tiny_model


def _calib(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(2)]


def test_sequential_changes_inputs_not_targets():
    lm = tiny_model("llama", layers=4)
    model, adapter, calib = lm.model, lm.adapter, _calib()
    cfg = FipsConfig(group_size=2, steps=0)
    plans, _ = plan_groups(model, adapter, cfg)
    stats = input_statistics(model, adapter, linear_paths(model, adapter), calib)
    cache = teacher_io(model, adapter, [0, 1, 2, 3], calib)
    X_dense = {li: x.clone() for li, x in cache[0].items()}
    Y_dense = {li: y.clone() for li, y in cache[1].items()}
    # compress group 0 (layers 0-1) with its init, as compress_fips does before fitting group 1
    ini = init_group(model, plans[0], cfg, stats)
    masks = global_magnitude_masks(ini.scores, sum(s.numel() for s in ini.scores) // 4)
    install_group(model, plans[0], ini.U, ini.V, masks, torch.device("cpu"))
    layers = plans[1].layers
    tf = local_io(model, adapter, layers, ({li: X_dense[li] for li in layers}, {li: Y_dense[li] for li in layers}),
                  calib, sequential=False)
    sq = local_io(model, adapter, layers, ({li: X_dense[li] for li in layers}, {li: Y_dense[li] for li in layers}),
                  calib, sequential=True)
    for li in layers:
        torch.testing.assert_close(tf[1][li], Y_dense[li], rtol=0, atol=0)  # targets: the dense model's
        torch.testing.assert_close(sq[1][li], Y_dense[li], rtol=0, atol=0)  # unchanged by sequential
        torch.testing.assert_close(tf[0][li], X_dense[li], rtol=0, atol=0)  # teacher forcing: dense inputs
        assert sq[0][li].shape == X_dense[li].shape
        assert not torch.allclose(sq[0][li], X_dense[li], atol=1e-4)  # sequential: the student's inputs


def test_sequential_first_group_is_teacher_forced():
    lm = tiny_model("llama", layers=4)
    model, adapter, calib = lm.model, lm.adapter, _calib()
    cache = teacher_io(model, adapter, [0, 1], calib)
    X0 = {li: x.clone() for li, x in cache[0].items()}
    X, _ = local_io(model, adapter, [0, 1], cache, calib, sequential=True)  # nothing compressed yet
    for li in (0, 1):
        torch.testing.assert_close(X[li], X0[li], rtol=0, atol=1e-6)


def test_sequential_refit_runs_end_to_end():
    lm = tiny_model("llama", layers=4)
    cfg = FipsConfig(group_size=2, steps=4, sequential=True, refit="both", refit_iters=3)
    rep = compress_fips(lm.model, lm.adapter, cfg, _calib(), device=torch.device("cpu"), log=lambda m: None)
    for g in rep["groups"]:
        assert g["refit_error_u_before"] <= g["refit_error_v_before"] + 1e-6  # the U step never increases it
        assert g["refit_error_u_after"] <= g["refit_error_v_after"] + 1e-6
    assert torch.isfinite(lm.model(input_ids=_calib()[0]["input_ids"]).logits).all()
