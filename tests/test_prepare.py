"""Data preparation at scale (issue 14 item 6): a record too long to ever fit is a `path:line` problem found before
the tokenizer sees it, and memory stays bounded on many records (measured in a subprocess, peak RSS)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from imtune import weights
from imtune.cli import main
from imtune.prepare import chars_per_token, prepare_examples
from imtune.weights import loss_spec

LONG_WORDS = 40_000  # 200k characters: tokenizes fine, but cannot fit 64 tokens


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def long_file(tmp_path):
    return _write(tmp_path / "long.jsonl", [{"instruction": "Hi.", "output": "Hello."},
                                            {"instruction": "Read: " + "word " * LONG_WORDS, "output": "Done."},
                                            {"instruction": "Bye.", "output": "Goodbye."}])


@pytest.fixture
def seen(monkeypatch):
    """The length of the longest text the tokenizer was given."""
    longest = [0]
    real = weights._batch_encode

    def spy(texts, tokenizer):
        longest[0] = max([longest[0], *map(len, texts)])
        return real(texts, tokenizer)

    monkeypatch.setattr(weights, "_batch_encode", spy)
    return longest


def test_a_record_too_long_to_fit_is_dropped_before_tokenizing(tok, long_file, seen):
    prep = prepare_examples(long_file, tok, loss_spec("it"), max_length=64, cache=False)
    assert [str(p).split(": ")[0] for p in prep.report.dropped_unfit] == [f"{long_file}:2"]
    assert "cannot fit in --max-length 64 tokens" in str(prep.report.dropped_unfit[0])
    assert [e.source.line for e in prep.examples] == [1, 3] and prep.report.n_in == 3
    assert 0 < seen[0] <= 64 * chars_per_token(tok)  # the long text never reached the tokenizer
    assert f"first too long: {long_file}:2" in prep.summary()


def test_truncate_cuts_the_text_first_and_keeps_the_same_first_tokens(tok, long_file, seen):
    prep = prepare_examples(long_file, tok, loss_spec("im"), max_length=64, truncation="truncate", cache=False)
    ex = {e.source.line: e for e in prep.examples}[2]
    assert ex.truncated and len(ex) == 64 and not prep.report.dropped_unfit
    assert seen[0] <= 64 * chars_per_token(tok)
    whole = prep.renderer.render(next(c for c in prep.conversations if c.source.line == 2)).text
    assert ex.input_ids == tok(whole, add_special_tokens=False)["input_ids"][:64]


def test_inspect_names_the_long_record(long_file, capsys):
    assert main(["inspect", long_file, "--max-length", "64", "--color", "never"]) == 0
    assert f"first too long: {long_file}:2" in capsys.readouterr().err


def test_inspect_reads_only_the_records_it_shows(tmp_path, capsys):
    """--limit 3 streams three records: a broken line further on is never reached."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5))
                    + "{broken\n", encoding="utf-8")
    assert main(["inspect", str(path), "--limit", "3", "--color", "never"]) == 0
    assert "── example 2" in capsys.readouterr().out


N_SMALL, N_BIG = 1_000, 20_000


def _peak_rss_mb(args: list[str], cwd) -> float:
    """Peak RSS of `python -m imtune ARGS` in a fresh child (ru_maxrss of the children waited for, in MB)."""
    code = textwrap.dedent(f"""
        import resource, subprocess, sys
        p = subprocess.run([sys.executable, "-m", "imtune", *{args!r}], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "IMTUNE_NO_CACHE": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_data_stats_memory_grows_by_well_under_2kb_a_record(tmp_path):
    """The goal is 1M records in <= 2 GB; proportionally, each record may add at most 2 KB (20k records: 38 MB over a 1k-record run)
    (before the fix: ~15 KB a record, 3.0 GB at 200k)."""
    for n in (N_SMALL, N_BIG):
        _write(tmp_path / f"r{n}.jsonl", ({"instruction": f"Say {i} twice", "output": f"{i} {i}"} for i in range(n)))
    stats = ["data", "stats", "--json", "--template", "tulu"]
    small = _peak_rss_mb([*stats, str(tmp_path / f"r{N_SMALL}.jsonl")], tmp_path)
    big = _peak_rss_mb([*stats, str(tmp_path / f"r{N_BIG}.jsonl")], tmp_path)
    per_record_kb = (big - small) * 1024 / (N_BIG - N_SMALL)
    assert per_record_kb < 2.0, f"peak RSS {small:.0f} MB -> {big:.0f} MB: {per_record_kb:.1f} KB a record"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
