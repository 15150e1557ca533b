"""imtune sweep on random:tiny end to end, and the `nonzero` loss normalisation against a by-hand computation."""
from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import WORDS
from imtune.cli import main
from imtune.config import TrainConfig
from imtune.results import SweepResult
from imtune.rundir.read import metrics as read_metrics


def _data(path, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def test_normalize_nonzero_divides_by_the_count_of_weighted_tokens(tmp_path):
    """One step over every example: the logged loss is Σw·nll / #(w > 0) of the starting model, computed here with
    plain transformers logits, for a prompt weight 0.5 and a response weight 0.6 (Weighted Instruction Tuning)."""
    import torch.nn.functional as F

    from imtune.data.pack import collate
    from imtune.data.prepare import prepare_examples
    from imtune.data.weights import loss_spec
    from imtune.model.models import load_model, load_tokenizer
    from imtune.train.loop import train

    data = _data(tmp_path / "d.jsonl", 6)
    cfg = TrainConfig(model="random:tiny", data=data, output_dir=str(tmp_path / "run"), loss="weighted",
                      prompt_weight=0.5, weights="assistant=0.6,eot=0.6", normalize="nonzero", batch_size=6,
                      max_steps=1, packing=False, max_length=128, lr=1e-3, warmup_ratio=0.0, progress=False,
                      threads=1)
    run = train(cfg)
    (m,) = read_metrics(run, "train")
    prep = prepare_examples(data, load_tokenizer("random:tiny"), loss_spec("weighted", 0.5, "assistant=0.6,eot=0.6"),
                            max_length=128)
    model = load_model("random:tiny", dtype=torch.float32, seed=42)
    num, nonzero, wsum = 0.0, 0, 0.0
    with torch.no_grad():
        for ex in prep.examples:
            b = collate([ex], packed=False)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            nll = F.cross_entropy(logits[0], b.labels[0], ignore_index=-100, reduction="none")
            num += (nll * b.weights[0]).sum().item()
            nonzero += int((b.weights[0] > 0).sum())
            wsum += b.weights[0].sum().item()
    assert {round(w, 6) for ex in prep.examples for w in ex.weights} >= {0.5, 0.6}  # both weights are in play
    assert m["loss"] == pytest.approx(num / nonzero, rel=1e-6)
    assert num / nonzero != pytest.approx(num / wsum, rel=1e-3)  # and it is not the Σw normalisation


def test_sweep_end_to_end_on_random_tiny(tmp_path, capsys):
    data, held = _data(tmp_path / "d.jsonl", 8), _data(tmp_path / "h.jsonl", 6, seed=1)
    out = tmp_path / "sweep"
    argv = ["sweep", "--data", data, "--eval-data", held, "--model", "random:tiny", "--prompt-weights", "0.1,0",
            "--seeds", "0,1", "--max-steps", "2", "--eval-every", "2", "--eval-train-sample", "4", "--batch-size", "4",
            "--max-length", "128", "--lr", "1e-3", "--normalize", "nonzero", "--no-progress", "--threads", "1",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert SweepResult.from_json(result).to_json() == result  # the typed record reads it back unchanged
    rows = result["prompt_weights"]
    assert [r["prompt_weight"] for r in rows] == [0.0, 0.1]  # sorted
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    for r in rows:
        for key, measure in (("final", "heldout_loss"), ("best", "best_heldout_loss")):
            iv = r[key]
            assert iv["low"] <= iv["value"] <= iv["high"] and len(iv["per_seed"]) == 2
            assert iv["value"] == pytest.approx(cmp["evidence"]["measures"][measure]["values"][r["arm"]]["value"])
    rec = result["recommendation"]
    best = min(rows, key=lambda r: r["best"]["value"])
    assert rec["prompt_weight"] == best["prompt_weight"] and rec["rule"] and len(rec["interval"]) == 2
    assert best["best"]["difference_to_recommended"]["value"] == 0.0
    for seed in (0, 1):
        cfg = (out / "compare" / "arms" / "weighted-0.1" / f"seed-{seed}" / "config.yaml").read_text()
        assert "normalize: nonzero" in cfg and f"seed: {seed}" in cfg and "prompt_weight: 0.1" in cfg
    assert (out / "plots" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert f"λ = {rec['prompt_weight']:g}" in md
    # two steps of a tiny model cannot separate λs: the sweep must say they tie, never bold a winner
    assert rec["decided"] is (not rec["indistinguishable"])
    if not rec["decided"]:
        assert "No λ recommended" in printed and "ties with" in md and "**λ" not in md and rec["to_decide"]
        # ... and what would separate them, as this sweep's own command with more seeds (report_checks)
        import shlex

        from imtune.cli import build_parser

        seeds = next(s["command"] for s in rec["next"] if "--seeds" in shlex.split(s["command"] or "")[-2:])
        words = shlex.split(seeds)
        assert words[:2] == ["imtune", "sweep"] and "To decide" in printed and seeds in printed and seeds in md
        assert build_parser("sweep").parse_args(words[2:]).seeds == "0,1,2,3,4"
    else:
        assert "Recommended: λ" in printed
    assert "src='data:image/png;base64," in (out / "report.html").read_text()
    assert main(argv) == 0  # re-run: everything is reused
    assert capsys.readouterr().err.count("already trained") == 4


def test_sweep_refuses_a_per_arm_loss(capsys):
    assert main(["sweep", "--data", "x.jsonl", "--loss", "im"]) == 2
    assert "--prompt-weights" in capsys.readouterr().err
    assert main(["sweep", "--data", "x.jsonl", "--prompt-weights", "0.1"]) == 2


def test_a_tie_is_never_recommended():
    import dataclasses

    from imtune.experiments.sweep import recommendation_text
    from imtune.results import Recommendation

    rec = Recommendation.from_json({"prompt_weight": 0.1, "measure": "held-out output loss (best)", "value": 1.0,
                                    "interval": [0.9, 1.1], "indistinguishable": [0.5], "decided": False, "rule": "r",
                                    "to_decide": "more seeds"})
    text = recommendation_text(rec, bold=True)
    assert text.startswith("No λ recommended") and "ties with λ = 0.5" in text and "**" not in text
    decided = dataclasses.replace(rec, indistinguishable=[], decided=True)
    assert recommendation_text(decided, bold=True).startswith(
        "Recommended: **λ = 0.1**")


def test_sweep_dry_run_prints_the_plan_of_the_whole_grid_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", _data(tmp_path / "d.jsonl", 40), "--model", "random:tiny", "--prompt-weights", "0,0.1,1",
                 "--seeds", "0,1", "--max-steps", "3", "--dry-run", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "plan: 6 run(s) to train" in captured.err and "estimated: ~" in captured.err and "B of disk" in captured.err
    assert "--dry-run: nothing trained" in captured.err and "Recommended" not in captured.out + captured.err
    assert not list(out.rglob("arms")) and not list(out.rglob("metrics.jsonl")) and not (out / "sweep.json").exists()
