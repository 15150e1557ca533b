"""compare's data (imtune.experiments.data): the records are tokenized once — the stats measure the same tokens the
training part is weighed from — and the stats are what `data stats` measures on the same records."""
from __future__ import annotations

import json

import pytest

from helpers import patch_everywhere
from imtune.analysis.stats import dataset_stats
from imtune.config import TrainConfig
from imtune.data import tokenize
from imtune.data.prepare import load
from imtune.data.templates import Renderer
from imtune.experiments.arms import CompareSettings, parse_arms
from imtune.experiments.data import materialise_data
from imtune.model.models import load_tokenizer


def _records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Repeat the number {i} " + "please " * (i % 5)},
                          {"role": "assistant", "content": f"{i} " * (1 + i % 3)}]} for i in range(n)]


@pytest.mark.parametrize("val_fraction", [0.0, 0.3])
def test_compare_tokenizes_every_record_once_and_measures_those_tokens(tmp_path, monkeypatch, val_fraction):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(30)))
    real, texts = tokenize.encode, []

    def counted(rendered, tokenizer, split=None):
        texts.extend(r.text for r in rendered)
        return real(rendered, tokenizer, split)

    patch_everywhere(monkeypatch, tokenize, "encode", counted)
    monkeypatch.setenv("IMTUNE_NO_CACHE", "1")  # every preparation tokenizes: a second one would be counted
    base = TrainConfig(model="random:tiny", data=str(data), template="chatml", max_length=64)
    s = CompareSettings(out=tmp_path / "cmp", base=base, arms=parse_arms("it,im"), heldout_fraction=0.4,
                        val_fraction=val_fraction)
    got = materialise_data(s, tmp_path / "cmp")
    assert got["n_train"] + got["n_heldout"] == 30 and got["n_val"] == (0 if val_fraction == 0 else 4)
    assert len(texts) == 30 and len(set(texts)) == 30  # each record rendered and tokenized exactly once

    tok = load_tokenizer("random:tiny")  # the stats are those of tokenizing the file again, as `data stats` does
    again = dataset_stats(load(str(data))[0], tok, Renderer("chatml", tok), "tokens", 64)
    _close(got["stats"], again, "stats")


def _close(a, b, where: str) -> None:
    """Equal, numbers up to the last bits (the parts are summed in another order than the whole file)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12), where
    else:
        assert a == b, where
