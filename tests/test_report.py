"""imtune.report on hand-made comparison directories (no training): the verdict's decisions and thresholds, and a
report whose tables and plots come from compare.json and metrics.jsonl alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imtune.report import THRESHOLDS, verdict, write_report


def make_dir(tmp_path: Path, heldout: dict, train: dict, curves: dict | None = None, extra: dict | None = None,
             seed: int = 42) -> Path:
    """A comparison directory with arms named by `heldout`'s keys. curves: arm -> held-out losses at eval points."""
    arms = []
    for i, name in enumerate(heldout):
        run = tmp_path / "arms" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"loss: {name}\nseed: {seed}\n")
        pts = (curves or {}).get(name, [heldout[name]])
        lines = [{"type": "train", "step": s + 1, "loss": 2.0 - 0.1 * s, "loss_output": 1.5 - 0.1 * s - 0.01 * i,
                  "tokens": 100 * (s + 1), "time": 1.5 * (s + 1)} for s in range(3)]
        lines += [{"type": "eval", "step": 3 * k // max(len(pts) - 1, 1), "epoch": 0.5 * k,
                   "train_output_loss": train[name] + 0.01 * (len(pts) - 1 - k), "eval_output_loss": v}
                  for k, v in enumerate(pts)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        res = {"train": {"n": 10, "output_loss": train[name]}, "heldout": {"n": 5, "output_loss": heldout[name]},
               "gap": heldout[name] - train[name], **(extra or {}).get(name, {})}
        arms.append({"spec": name, "name": name, "dir": f"arms/{name}", "overrides": {"loss": name},
                     "results": res})
    summary = {"version": 1, "commands": [{"argv": ["imtune", "compare", "--data", "f.jsonl"], "time": "t",
                                           "cwd": "/x"}],
               "settings": {"base_config": {"model": "random:tiny", "seed": seed}},
               "data": {"source": "f.jsonl", "n_train": 10, "n_heldout": 5, "split": {"kind": "split",
                                                                                     "heldout_fraction": 0.1},
                        "stats": _stats()},
               "arms": arms}
    summary["verdict"] = verdict(summary, tmp_path)
    (tmp_path / "compare.json").write_text(json.dumps(summary))
    return tmp_path


def _stats() -> dict:
    from imtune.stats import dataset_stats
    from imtune.types import Conversation, Message

    convs = [Conversation((Message("user", "a long instruction " * 5), Message("assistant", "short")))] * 3
    return dataset_stats(convs, unit="words")


def measure(v: dict, key: str) -> dict:
    return next(m for m in v["measures"] if m["key"] == key)


def test_im_win_beyond_one_percent_is_a_win_with_its_size(tmp_path):
    d = make_dir(tmp_path, heldout={"it": 0.60, "im": 0.49}, train={"it": 0.20, "im": 0.35})
    v = json.loads((d / "compare.json").read_text())["verdict"]
    m = measure(v, "heldout_loss")
    assert m["best"] == "im" and m["comparisons"][0]["decided"]
    assert m["comparisons"][0]["relative"] == pytest.approx(0.11 / 0.60)
    assert "On held-out output loss, **im** won: 0.4900 vs it 0.6000 (Δ 0.1100 = 18.3% lower" in v["text"]
    assert "im won on held-out output loss, train/held-out gap" in v["text"]
    assert "lowest for it" in v["text"]  # IT fits its training outputs more closely, and the text says so


def test_it_win_is_reported_as_such(tmp_path):
    v = verdict(json.loads((make_dir(tmp_path, {"it": 0.45, "im": 0.60}, {"it": 0.3, "im": 0.3})
                            / "compare.json").read_text()), tmp_path)
    assert "On held-out output loss, **it** won" in v["text"] and "it won on held-out output loss" in v["text"]


def test_under_one_percent_is_no_difference(tmp_path):
    v = verdict(json.loads((make_dir(tmp_path, {"it": 0.500, "im": 0.503}, {"it": 0.3, "im": 0.3})
                            / "compare.json").read_text()), tmp_path)
    m = measure(v, "heldout_loss")
    c = m["comparisons"][0]
    assert not c["decided"] and c["threshold"] == pytest.approx(THRESHOLDS["loss_relative"] * 0.503)
    assert "On held-out output loss, no difference" in v["text"]
    assert "no arm won any measure beyond its threshold" in v["text"]


def test_eval_to_eval_spread_raises_the_threshold(tmp_path):
    # 0.10 apart at the end, but IT's held-out loss moved 0.20 between its last two evaluation points.
    d = make_dir(tmp_path, {"it": 0.60, "im": 0.50}, {"it": 0.3, "im": 0.3},
                 curves={"it": [0.9, 0.4, 0.60], "im": [0.9, 0.52, 0.50]})
    m = measure(verdict(json.loads((d / "compare.json").read_text()), d), "heldout_loss")
    c = m["comparisons"][0]
    assert c["threshold"] == pytest.approx(0.20) and c["threshold_rule"] == "eval-to-eval change"
    assert not c["decided"]


def test_the_verdict_says_whether_held_out_loss_turned_up(tmp_path):
    d = make_dir(tmp_path, {"it": 0.60, "im": 0.50}, {"it": 0.1, "im": 0.3},
                 curves={"it": [0.9, 0.5, 0.60], "im": [0.9, 0.5, 0.502]})
    text = verdict(json.loads((d / "compare.json").read_text()), d)["text"]
    assert "rose after its best point (by more than 1%) for it (best 0.5000 at step 1, last 0.6000 at step 3)" in text
    assert "levelled off (within 1% of its best) for im" in text
    d2 = make_dir(tmp_path / "b", {"it": 0.60, "im": 0.50}, {"it": 0.1, "im": 0.3},
                  curves={"it": [0.9, 0.7, 0.60], "im": [0.9, 0.6, 0.50]})
    assert "still falling at the last evaluation for every arm (it, im)" in verdict(
        json.loads((d2 / "compare.json").read_text()), d2)["text"]


def test_exact_match_uses_paired_standard_errors(tmp_path):
    n = 20
    em = {"it": [True] * 5 + [False] * 15, "im": [True] * 15 + [False] * 5}
    extra = {a: {"exact_match": {"n": n, "accuracy": sum(c) / n, "correct": c}} for a, c in em.items()}
    d = make_dir(tmp_path, {"it": 0.5, "im": 0.5}, {"it": 0.3, "im": 0.3}, extra=extra)
    m = measure(verdict(json.loads((d / "compare.json").read_text()), d), "exact_match")
    c = m["comparisons"][0]
    # differences: ten 1 (im right, it wrong), ten 0; mean 0.5 -> sd = sqrt(20·0.25/19), SE = sd / sqrt(20)
    assert m["best"] == "im" and c["threshold"] == pytest.approx(2 * (20 * 0.25 / 19) ** 0.5 / 20 ** 0.5)
    assert c["decided"]
    # One more right answer out of 20 is within the noise.
    extra["im"]["exact_match"] = {"n": n, "accuracy": 0.3, "correct": [True] * 6 + [False] * 14}
    d2 = make_dir(tmp_path / "b", {"it": 0.5, "im": 0.5}, {"it": 0.3, "im": 0.3}, extra=extra)
    assert not measure(verdict(json.loads((d2 / "compare.json").read_text()), d2), "exact_match")["comparisons"][0][
        "decided"]


def test_report_files_come_from_the_directory(tmp_path):
    d = make_dir(tmp_path, {"it": 0.60, "im": 0.49}, {"it": 0.20, "im": 0.35},
                 curves={"it": [0.8, 0.55, 0.60], "im": [0.8, 0.5, 0.49]})
    md, page = write_report(d)
    text = md.read_text()
    assert "| it | 0.2000 | 0.6000 | 0.4000 |" in text and "| im | 0.3500 | 0.4900 | 0.1400 |" in text
    assert "| it | 42 | 0 | 0.00 | 0.2200 | 0.8000 | 0.5800 |" in text  # the eval points of metrics.jsonl (arm, seed, ...)
    assert "imtune compare --data f.jsonl" in text and "loss: im" in text
    assert "recommendation" in text and "What this can and cannot show" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<strong>im</strong> won" in html
    for png in ("loss_curves.png", "gap.png"):
        assert (d / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (d / "plots" / "scores.png").exists()  # no accuracy measured: no empty plot
