"""`imtune demo`: the demo's own recipe runs end to end on random:tiny (every arm with every seed in SEEDS, each its own
run directory, the comparison written), and the regime summary reads each run's held-out curve right."""
from __future__ import annotations

import json

import yaml

from imtune.cli import main
from imtune.commands import demo
from imtune.runlog import read_metrics


def test_the_demos_recipe_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    # The recipe as it stands (family, n, ratio, template, lr, batch, eval cadence, evaluation), only the model and
    # the number of steps overridden.
    assert main(["demo", "--model", "random:tiny", "--out", str(out), "--max-steps", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    runs = {}
    for cfg_path in out.rglob("config.yaml"):
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        assert (cfg_path.parent / "DONE").exists() and (cfg_path.parent / "final").is_dir()
        assert cfg["template"] == demo.TRAIN["template"] and cfg["lr"] == demo.TRAIN["lr"]
        runs.setdefault(cfg["loss"], set()).add(cfg["seed"])
        evals = read_metrics(cfg_path.parent, "eval")
        assert [e["step"] for e in evals] == [0, 2] and all(e["eval_output_loss"] > 0 for e in evals)
    assert runs == {"it": set(demo.SEEDS), "im": set(demo.SEEDS)}  # every arm with >= 2 seeds
    assert len(demo.SEEDS) >= 2
    comparisons = [c for c in out.rglob("compare.json") if (c.parent / "arms").is_dir()]  # not arm caches
    assert comparisons
    for c in comparisons:
        summary = json.loads(c.read_text(encoding="utf-8"))
        assert {a["spec"] for a in summary["arms"]} == {"it", "im"}
        assert summary["data"]["n_train"] == demo.DATA["n"]
    assert "Overfitting regime" in printed and "regime" in printed
    for arm in ("it", "im"):
        for s in demo.SEEDS:
            assert f"{arm} seed {s}: min" in printed
    assert "done in" in printed


def write_run(root, name: str, loss: str, seed: int, curve: list[float]) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"loss": loss, "prompt_weight": None, "seed": seed}))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"type": "eval", "step": 2 * i, "eval_output_loss": v}) + "\n" for i, v in enumerate(curve))
        + json.dumps({"type": "train", "step": 1, "loss": 9.0}) + "\n")


def test_regime_summary_from_held_out_curves(tmp_path):
    write_run(tmp_path, "a/it", "it", 0, [2.0, 1.0, 1.05])  # +5%: passed its best point
    write_run(tmp_path, "b/it", "it", 1, [2.0, 1.0, 1.03])  # +3%
    write_run(tmp_path, "a/im", "im", 0, [2.0, 1.2, 1.21])  # +0.8%: not
    write_run(tmp_path, "b/im", "im", 1, [2.0, 1.5, 1.4])  # still falling
    rows = demo.held_out_curves(tmp_path)
    got = {(r["arm"], r["seed"]): (r["min"], r["min_step"], r["final"], round(r["rise"], 4)) for r in rows}
    assert got == {("it", 0): (1.0, 2, 1.05, 0.05), ("it", 1): (1.0, 2, 1.03, 0.03),
                   ("im", 0): (1.2, 2, 1.21, round(1.21 / 1.2 - 1, 4)), ("im", 1): (1.4, 4, 1.4, 0.0)}
    text = demo.regime_text(rows)
    assert "regime reached: it with every seed" in text and "im with" not in text
    assert text.count("PASSED its best point") == 2

    write_run(tmp_path, "c/im", "im", 2, [2.0, 1.0, 1.1])  # one im seed passes too
    assert "im with some seeds" in demo.regime_text(demo.held_out_curves(tmp_path))

    flat = tmp_path / "flat"
    write_run(flat, "it", "it", 0, [2.0, 1.0, 1.01])
    assert "regime NOT reached" in demo.regime_text(demo.held_out_curves(flat))
