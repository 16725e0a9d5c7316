"""The out-of-domain evaluation text (``--data wordnet``): WordNet glosses shipped with timm."""
import pytest

from fips_rt.data import documents, gloss_sentence, wordnet_glosses
from fips_rt.errors import FipsError


def test_gloss_sentence():
    assert gloss_sentence("a small  dog") == "A small dog."
    assert gloss_sentence("(botany) a plant?") == "(botany) a plant?"
    assert gloss_sentence("  ") == ""


def test_wordnet_halves_are_disjoint_english_and_eval_only():
    pytest.importorskip("timm")
    val, test = wordnet_glosses("validation"), wordnet_glosses("test")
    assert len(val) > 400 and len(test) > 400  # 20 glosses per document
    sv = {s for d in val for s in d.split(". ")}
    st = {s for d in test for s in d.split(". ")}
    assert len(sv & st) < 0.01 * len(sv)  # split by synset; only sentence-split artefacts may coincide
    assert documents("wordnet", "test") == list(test)
    with pytest.raises(FipsError):
        wordnet_glosses("train")  # never calibration


def test_compress_refuses_wordnet_calibration(tmp_path):
    from click.testing import CliRunner
    from fips_rt.cli import cli
    r = CliRunner().invoke(cli, ["compress", str(tmp_path / "no-model"), "--calib", "wordnet",
                                 "--out", str(tmp_path / "m.pt")])
    assert r.exit_code != 0 and "evaluation only" in str(r.exception or r.output)
