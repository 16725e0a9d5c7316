"""`fips generate` and `fips chat` on a tiny exported model (torch-free commands of fips_rt.runtime.cli)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_runtime_helpers import needs_exporter, runtime_env, tiny_lm_dir

pytestmark = needs_exporter
FIPS = str(Path(sys.executable).with_name("fips"))


def _fips(*args, stdin=None):
    return subprocess.run([FIPS, *map(str, args)], input=stdin, capture_output=True, text=True, env=runtime_env(),
                          timeout=600)


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_lm_dir("fips", last_logits_only=True)


def test_generate_prints_what_model_generate_gives(lm_dir):
    from fips_rt.runtime import Model
    want = Model.load(lm_dir, threads=1).generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    p = _fips("generate", lm_dir, "-p", "Once upon a time", "-n", 12, "--ignore-eos", "-t", 1)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want.text + "\n"
    j = _fips("generate", lm_dir, "-p", "-", "-n", 12, "--ignore-eos", "--json", "-t", 1, stdin="Once upon a time")
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["token_ids"] == want.token_ids


def test_generate_refuses_bad_options_in_one_line(lm_dir):
    p = _fips("generate", lm_dir, "-p", "x", "--top-p", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = _fips("generate", lm_dir.parent / "does-not-exist", "-p", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_chat_reads_turns_from_stdin(lm_dir):
    from fips_rt.runtime import Model
    m = Model.load(lm_dir, threads=1)
    first = m.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=6).text
    p = _fips("chat", lm_dir, "-n", 6, "-t", 1, stdin="Hello there\n\n/reset\nHello there\n/exit\nnever read\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    # two identical conversations (the /reset in between), the line after /exit never answered
    assert lines[0] == first and lines[1] == first and "Traceback" not in p.stderr
    assert p.stdout.count("\n") == 2
