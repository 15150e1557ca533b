"""imtune compare --bench alpacaeval:PATH --bench mtbench:DIR: every arm answers, one judge (a real `imtune serve`
process) scores them all, and compare.json / report.md carry the scores with the judge's name and their scale."""
from __future__ import annotations

import json

from conftest import shared_file
from imtune.cli import main

JUDGE = "judge-tiny"


def test_compare_with_judged_benchmarks(tmp_path, capsys, judge_server):
    from imtune.data.synth import synthesize, write_jsonl

    alpaca = str(shared_file("eval/alpaca_eval/text_davinci_003_outputs.json"))
    mt = shared_file("eval/mt_bench/question.jsonl").parent
    train, heldout = synthesize("lookup", 8, 10.0, seed=0, heldout=4)
    data = write_jsonl(tmp_path / "lookup.jsonl", train, "lookup", 0, "train")
    held = write_jsonl(tmp_path / "lookup.heldout.jsonl", heldout, "lookup", 0, "heldout")
    base = ["compare", "--data", str(data), "--eval-data", str(held), "--model", "random:tiny", "--arms", "it,im",
            "--max-steps", "1", "--batch-size", "2", "--max-length", "256", "--bleu-samples", "0",
            "--max-new-tokens", "4", "--no-progress", "--val-fraction", "0", "--bench", f"alpacaeval:{alpaca}",
            "--bench", f"mtbench:{mt}", "--bench-limit", "1", "--bench-max-new-tokens", "4"]
    assert main([*base, "--out", str(tmp_path / "nojudge")]) == 2  # a judged benchmark needs a judge
    assert "--judge-url" in capsys.readouterr().err

    out = tmp_path / "cmp"
    assert main([*base, "--judge-url", judge_server[1], "--judge-model", JUDGE, "--judge-cache", "none",
                 "--judge-max-tokens", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "compare.json").read_text())
    assert summary["settings"]["eval"]["judge"] == {"judge_url": judge_server[1], "judge_model": JUDGE}
    assert summary["settings"]["eval"]["judge_max_tokens"] == 4
    for arm in summary["arms"]:
        b = arm["results"]["bench"]
        assert b["alpacaeval"]["metric"] == "win_rate" and b["alpacaeval"]["scale"] == "fraction"
        assert b["mtbench"]["metric"] == "score" and b["mtbench"]["scale"] == "1-10"
        assert b["alpacaeval"]["judge"] == b["mtbench"]["judge"] == JUDGE
        assert (out / "arms" / arm["name"] / "seed-42" / "eval" / "bench" / "alpacaeval.json").exists()
    md = (out / "report.md").read_text()
    assert f"alpacaeval (win_rate, judge {JUDGE}" in md and f"mtbench (score, judge {JUDGE}" in md
