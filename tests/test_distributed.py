"""Groups over ranks with torch.distributed (gloo): 2 ranks give the 1-rank checkpoint exactly, and a
killed rank makes the run fail with one clear line, within the process-group timeout (no hang)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ARGS = ["--mlp-budget", "0.5", "--group-size", "1", "--sparsity", "0.75", "--calib-tokens", "512", "--seq-len", "128",
        "--steps", "3", "--batch-tokens", "64", "--refit", "after", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fips_rt.models import random_llama_folder
    return random_llama_folder(tmp_path_factory.mktemp("llama") / "tiny", "tiny", shard_bytes=1 << 20)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)
    return env


def _tensors(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)["tensors"]


@pytest.mark.parametrize("steps", ["3", "0"])  # 0: the inits wait compact, bounded per rank
def test_two_ranks_equal_one_rank(folder, tmp_path, steps):
    args = [a if a != "3" else steps for a in ARGS]
    one = subprocess.run([sys.executable, "-m", "fips_rt.cli", "compress", str(folder), "--onload", "on", *args,
                          "--out", str(tmp_path / "one.pt")], env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_port()), "-m", "fips_rt.cli", "compress", str(folder), *args,
                          "--out", str(tmp_path / "two.pt")], env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 1/2: groups sent to rank 0" in two.stderr
    a, b = _tensors(tmp_path / "one.pt"), _tensors(tmp_path / "two.pt")
    assert set(a) == set(b) and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("two.pt.state"))


def test_killed_rank_fails_with_one_line(folder, tmp_path):
    port = str(_port())
    cmd = [sys.executable, "-m", "fips_rt.cli", "compress", str(folder), "--distributed", "--dist-timeout", "20",
           *ARGS[:-1], "--out", str(tmp_path / "k.pt")]  # with progress lines
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    r0, r1 = procs
    # rank 0 says when both ranks have joined the process group and planned the run
    t0, seen = time.time(), ""
    while "block-by-block onloading" not in seen and time.time() - t0 < 300:
        line = r0.stderr.readline()
        if not line:
            break
        seen += line
    r1.send_signal(signal.SIGKILL)
    r1.wait(timeout=60)
    try:
        _, err = r0.communicate(timeout=240)  # hang guard: the process group's timeout is 20 s
    except subprocess.TimeoutExpired:
        r0.kill()
        pytest.fail("rank 0 hung after its peer was killed")
    err = seen + err
    assert r0.returncode != 0
    assert "error: distributed run failed on rank 0" in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "k.pt").exists()
