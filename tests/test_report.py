"""imtune.report.write on hand-made comparison directories (no training): the verdict's decisions and thresholds, and a
report whose tables and plots come from compare.json and metrics.jsonl alone."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imtune.report.runs import THRESHOLDS
from imtune.report.write import verdict as typed_verdict, write_report
from imtune.results import CompareResult


def verdict(summary: dict, d: Path) -> dict:
    """The verdict of a compare.json object as the tests build it, read as compare.json is (imtune.results)."""
    return typed_verdict(CompareResult.from_json(summary), d).to_json()


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
    from imtune.analysis.stats import dataset_stats
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
    assert v["headline"].startswith("im won on held-out output loss, train/held-out gap")
    assert v["text"].startswith(v["headline"])
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
    assert v["headline"] == "No arm won: every difference is within its threshold (one seed, no intervals)"
    assert v["text"].startswith(v["headline"] + "\n")


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
    # the eval points of metrics.jsonl (arm, seed, ...)
    assert "| it | 42 | 0 | 0.00 | 0.2200 | 0.8000 | 0.5800 |" in text
    assert "imtune compare --data f.jsonl" in text and "loss: im" in text
    assert "recommendation" in text and "What this can and cannot show" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<strong>im</strong> won" in html
    for png in ("loss_curves.png", "gap.png"):
        assert (d / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (d / "plots" / "scores.png").exists()  # no accuracy measured: no empty plot


# ----------------------------------------------------------------------------------------------------------------
# The headline, warnings, advice, example answers, versions, configs, plots and the page in a browser
def with_evidence(d: Path, diff: tuple[float, float, float], n_seeds: int = 2, n_examples: int = 150) -> dict:
    """Turn make_dir's comparison into one with intervals: im − it on held-out output loss = diff (value, low, high).
    Returns the verdict compare would write."""
    summary = json.loads((d / "compare.json").read_text())
    value, low, high = diff
    vals = {a["spec"]: {"value": a["results"]["heldout"]["output_loss"]} for a in summary["arms"]}
    summary["settings"]["seeds"] = list(range(n_seeds))
    summary["evidence"] = {"reference": "it", "method": "bootstrap (test)", "level": 0.95, "n_seeds": n_seeds,
                           "n_examples": {"heldout": n_examples},
                           "measures": {"heldout_loss": {
                               "label": "held-out output loss (final)", "better": "lower", "values": vals,
                               "differences": {"it": {"value": 0.0, "low": 0.0, "high": 0.0},
                                               "im": {"value": value, "low": low, "high": high}}}}}
    summary["verdict"] = verdict(summary, d)
    (d / "compare.json").write_text(json.dumps(summary))
    return summary["verdict"]


def test_headline_says_winner_size_interval_and_evidence_in_one_line(tmp_path):
    d = make_dir(tmp_path, {"it": 0.60, "im": 0.29}, {"it": 0.2, "im": 0.3})
    v = with_evidence(d, (-0.31, -0.45, -0.18))
    assert v["headline"] == ("im beat it on held-out output loss (final): im − it −0.3100 (−51.7% of it's), 95% "
                             "interval −0.4500 to −0.1800 — 2 seeds × 150 held-out examples")
    assert "\n" not in v["headline"] and v["text"].startswith(v["headline"] + "\n")
    assert all(line.startswith("- ") for line in v["text"].split("\n\n", 1)[1].splitlines())  # then bullets
    md, page = write_report(d)
    lines = md.read_text().splitlines()
    assert lines[0].startswith("# imtune compare") and lines[2] == f"**{v['headline']}**"  # right under the title
    assert "class='headline'>im beat it on held-out output loss (final): im − it −0.3100" in page.read_text()
    # The reference winning keeps the tables' sign (arm − reference): one convention everywhere.
    d2 = make_dir(tmp_path / "b", {"it": 0.29, "im": 0.60}, {"it": 0.2, "im": 0.3})
    assert with_evidence(d2, (0.31, 0.18, 0.45))["headline"].startswith(
        "it beat im on held-out output loss (final): im − it +0.3100 (+106.9% of it's), 95% interval +0.1800 to "
        "+0.4500")
    d3 = make_dir(tmp_path / "c", {"it": 0.60, "im": 0.50}, {"it": 0.2, "im": 0.3})
    assert with_evidence(d3, (-0.1, -0.25, 0.02))["headline"] == (
        "No arm won: every interval includes zero (held-out output loss (final): im − it −0.1000 (−16.7% of it's), "
        "95% interval −0.2500 to +0.0200) — 2 seeds × 150 held-out examples")


def test_headline_says_undecided_when_the_budget_cannot_decide(tmp_path):
    """An interval that excludes zero is not enough: too few held-out examples, every run still improving when
    training stopped, or a difference too small to act on make the headline "Undecided" and say why."""
    d = make_dir(tmp_path, {"it": 0.560, "im": 0.5532}, {"it": 0.2, "im": 0.3})
    v = with_evidence(d, (-0.0068, -0.0111, -0.0035), n_examples=14)  # the smoke test: −1.2%, 14 examples
    assert v["headline"].startswith("Undecided on held-out output loss (final): im − it −0.0068 (−1.2% of it's)")
    assert "only 14 held-out examples per seed" in v["headline"] and "below the practical threshold of 2%" in \
        v["headline"] and "beat" not in v["headline"]
    falling = make_dir(tmp_path / "b", {"it": 0.60, "im": 0.29}, {"it": 0.2, "im": 0.3},
                       curves={"it": [0.9, 0.7, 0.60], "im": [0.9, 0.5, 0.29]})
    v = with_evidence(falling, (-0.31, -0.45, -0.18))
    assert v["headline"].startswith("Undecided") and "still falling when training stopped" in v["headline"]
    passed = make_dir(tmp_path / "c", {"it": 0.60, "im": 0.29}, {"it": 0.2, "im": 0.3},
                      curves={"it": [0.9, 0.5, 0.60], "im": [0.9, 0.5, 0.29]})
    assert with_evidence(passed, (-0.31, -0.45, -0.18))["headline"].startswith("im beat it")  # decided


def test_terminal_output_starts_with_the_headline(tmp_path, capsys):
    from imtune.commands.compare import show

    d = make_dir(tmp_path, {"it": 0.60, "im": 0.29}, {"it": 0.2, "im": 0.3})
    v = with_evidence(d, (-0.31, -0.45, -0.18))
    show(d)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == v["headline"] and "\n- On held-out output loss" in out


def _write_metrics(run: Path, train_sample: list[float]) -> None:
    """metrics.jsonl with eval points at steps 0, 1, ... whose fixed-train-sample loss is `train_sample`."""
    lines = [{"type": "train", "step": s + 1, "loss": v, "loss_output": v, "tokens": 10, "time": 1.0}
             for s, v in enumerate(train_sample[1:])]
    lines += [{"type": "eval", "step": s, "epoch": 0.5 * s, "train_output_loss": v, "eval_output_loss": v + 0.1}
              for s, v in enumerate(train_sample)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_a_run_that_learned_nothing_is_named_with_its_numbers(tmp_path):
    d = make_dir(tmp_path, {"it": 10.6, "im": 2.0, "all": 3.0}, {"it": 10.5, "im": 1.2, "all": 2.5})
    for name in ("it", "im", "all"):  # a 49,152-token vocabulary: a uniform guess scores ln(49152) = 10.80
        (d / "arms" / name / "final").mkdir()
        (d / "arms" / name / "final" / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    _write_metrics(d / "arms" / "im", [2.0, 1.6, 1.2])  # learned
    _write_metrics(d / "arms" / "all", [2.5, 2.6, 2.5])  # not below its step-0 value
    summary = json.loads((d / "compare.json").read_text())
    v = verdict(summary, d)
    assert v["learned_nothing"]["warning"].startswith(
        "2 of 3 runs learned nothing (a uniform guess over the 49,152-token vocabulary scores ln 49,152 = 10.8027 "
        "nats per token). Comparisons involving them say nothing about the loss modes")
    assert v["learned_nothing"]["runs"] == [
        "arm it seed 42: final training output loss 10.5000 = 97% of ln 49,152",
        "arm all seed 42: train-sample output loss 2.5000 at step 0 → 2.5000 at step 2 (not 1% lower)"]
    assert len(v["warnings"]) == 1 and "arm all seed 42" in v["warnings"][0]
    assert v["headline"].endswith(" — ⚠ 2 of 3 runs learned nothing")
    md = write_report(d, recompute=True)[0].read_text()  # the runs changed after compare.json's verdict: rebuild
    assert "> ⚠ **Warning:** 2 of 3 runs learned nothing" in md and "> - arm it seed 42: final training" in md


def test_the_verdict_is_computed_once_and_trusted_by_the_report_and_the_terminal(tmp_path, capsys):
    """compare.json holds the verdict; the report and `imtune compare`'s terminal view show that one (a marker put
    into it shows up in both), and only --report-only (recompute) computes it again from the files and stores it."""
    from imtune.commands.compare import show

    d = make_dir(tmp_path, {"it": 2.0, "im": 1.5}, {"it": 1.9, "im": 1.4})
    write_report(d)  # computes the verdict (compare.json had none) and stores it
    summary = json.loads((d / "compare.json").read_text())
    assert summary["verdict"]["version"] == 1 and summary["verdict"]["headline"]
    summary["verdict"]["headline"] = summary["verdict"]["text"] = "MARKER headline"
    (d / "compare.json").write_text(json.dumps(summary))
    assert "MARKER headline" in write_report(d)[0].read_text()
    show(d)
    assert capsys.readouterr().out.startswith("MARKER headline")
    md = write_report(d, recompute=True)[0].read_text()
    assert "MARKER" not in md and "MARKER" not in (d / "compare.json").read_text()


@pytest.mark.parametrize("heldout, arms, agreement", [
    ({"it": 0.60, "im": 0.49}, None, "agree"),  # the data's instructions are long: the advice is im
    ({"it": 0.49, "im": 0.60}, None, "disagree"),
    ({"it": 0.500, "im": 0.502}, None, "undecided"),
    ({"it": 0.60, "weighted:0.1": 0.49}, {"weighted:0.1": {"loss": "weighted", "prompt_weight": 0.1}}, "not tested"),
])
def test_the_data_stats_advice_stands_next_to_the_outcome(tmp_path, heldout, arms, agreement):
    d = make_dir(tmp_path, heldout, {a: 0.3 for a in heldout})
    summary = json.loads((d / "compare.json").read_text())
    for a in summary["arms"]:
        a["overrides"] = (arms or {}).get(a["spec"], {"loss": a["spec"]})
    assert summary["data"]["stats"]["recommendation"]["mode"] == "im"
    adv = verdict(summary, d)["advice"]
    assert adv["advised"] == "--loss im" and adv["agreement"] == agreement, adv
    assert adv["text"].startswith("`imtune data stats` advised `--loss im` (instruction/output length ratio")
    assert f"— **{agreement}**" in adv["text"]
    assert f"Advice vs outcome: {adv['text']}" in write_report(d)[0].read_text()


def test_example_answers_side_by_side_or_a_note_that_there_are_none(tmp_path):
    d = make_dir(tmp_path, {"it": 0.6, "im": 0.5}, {"it": 0.3, "im": 0.3})
    assert "No generations were made" in write_report(d)[0].read_text()
    for arm in ("it", "im"):
        rows = [{"index": i, "source": f"test.jsonl:{i + 1}", "instruction": f"What is {i} + {i}?",
                 "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "output": f"{arm} says {2 * i}",
                 "reference": str(2 * i), "correct": arm == "im"} for i in range(5)]
        (d / "arms" / arm / "eval").mkdir()
        (d / "arms" / arm / "eval" / "compare-exact-match.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    md = write_report(d)[0].read_text()
    assert "| prompt | reference | it | im |" in md and "No generations were made" not in md
    assert "| What is 2 + 2? | 4 | it says 4 | im says 4 |" in md
    assert "What is 3 + 3?" not in md  # three examples, not all


def test_versions_are_recorded_and_shown(tmp_path):
    from imtune import __version__
    from imtune.model.provenance import model_fingerprint, versions

    v = versions("random:tiny")
    assert v["imtune"] == __version__ and v["torch"] and v["transformers"] and v["python"].count(".") == 2
    assert v["model"]["kind"] == "random" and len(v["model"]["fingerprint"]) == 16
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 100}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    fp = model_fingerprint(str(model))
    assert fp["vocab_size"] == 100 and fp["weights_bytes"] == 10
    (model / "model.safetensors").write_bytes(b"x" * 11)
    assert model_fingerprint(str(model))["fingerprint"] != fp["fingerprint"]  # other weights, other fingerprint
    d = make_dir(tmp_path / "cmp", {"it": 0.6, "im": 0.5}, {"it": 0.3, "im": 0.3})
    assert "not recorded" in write_report(d)[0].read_text()
    summary = json.loads((d / "compare.json").read_text())
    summary["versions"] = v
    (d / "compare.json").write_text(json.dumps(summary))
    md = write_report(d)[0].read_text()
    assert f"imtune {__version__} · torch {v['torch']} · transformers {v['transformers']}" in md
    assert v["model"]["fingerprint"] in md


def test_configs_are_shown_as_a_diff_from_the_base(tmp_path):
    d = make_dir(tmp_path, {"it": 0.6, "im": 0.5}, {"it": 0.3, "im": 0.3})
    (d / "arms" / "im" / "config.yaml").write_text("model: random:tiny\nloss: im\nseed: 42\nlr: 0.001\n")
    md = write_report(d)[0].read_text()
    assert "| it | 42 | arms/it/config.yaml | loss: it |" in md
    assert "| im | 42 | arms/im/config.yaml | loss: im; lr: 0.001 |" in md  # model is the base's: not repeated
    assert md.count("model: random:tiny") == 1  # the base config, once


def test_plot_axes_do_not_turn_a_tiny_difference_into_a_visual_win(tmp_path):
    from imtune.report.plots import bars_figure, curves_figure
    from imtune.report.runs import load

    d = make_dir(tmp_path, {"it": 2.0, "im": 2.0001}, {"it": 1.9, "im": 1.9001})
    _write_metrics(d / "arms" / "it", [1.9, 1.9, 1.9])
    _write_metrics(d / "arms" / "im", [1.9001, 1.9001, 1.9001])
    summary, metrics, _ = load(d)
    fig = curves_figure(summary, metrics)
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert hi - lo >= 0.05 * 2.0, (ax.get_title(), lo, hi)
        assert ax.get_ylabel() == "output loss (nats per output token)" and ax.get_xlabel() == "optimizer step"
        assert not ax.yaxis.get_major_formatter().get_offset()  # no "+1.9" offset hiding the scale
    gap = bars_figure(summary, "gap").axes[0]
    assert gap.get_ylim()[1] - gap.get_ylim()[0] >= 0.05 * 2.0 and "nats" in gap.get_ylabel()


def test_html_report_renders_in_a_real_browser(tmp_path):
    """Chromium (Debian package `chromium`; not installed by `make setup`: too big for CI) takes a screenshot of
    report.html and dumps its DOM: the page is not blank and shows the headline."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None:
        pytest.skip("no chromium here (apt-get install -y chromium): the browser check needs a real browser")
    from PIL import Image

    d = make_dir(tmp_path / "cmp", {"it": 0.60, "im": 0.29}, {"it": 0.2, "im": 0.3},
                 curves={"it": [0.8, 0.55, 0.60], "im": [0.8, 0.5, 0.29]})
    v = with_evidence(d, (-0.31, -0.45, -0.18))
    page = write_report(d)[1]
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    png = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={png}", "--window-size=1280,2000", page.as_uri()], check=True,
                   capture_output=True, timeout=180)
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # text, tables and plots: not a blank (one-colour) page
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=180).stdout
    assert v["headline"] in dom and dom.count("data:image/png;base64,") == 2


@pytest.mark.parametrize("text, said", [
    ("{not json", "not readable as JSON"),
    ('[1, 2]', "not a JSON object"),
    ('{"version": 9, "arms": []}', "version 9"),
    ('{"version": 2, "arms": []}', '"settings" without a "base_config" object'),
    ('{"version": 2, "settings": {"base_config": {}}, "arms": "it"}', '"arms" is not a non-empty list'),
    ('{"version": 2, "settings": {"base_config": {}}, "arms": [{"name": "it", "runs": [{"seed": 0}]}]}',
     "a run without a \"dir\""),
])
def test_a_compare_json_imtune_did_not_write_is_refused_with_its_path(tmp_path, text, said):
    """compare.json is read in one place (report.runs.read_summary), and a damaged or foreign one is a message that
    names the file and what is wrong, not a traceback from deep inside the report."""
    from imtune.report.runs import read_summary
    from imtune.types import UsageError

    (tmp_path / "compare.json").write_text(text)
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'compare.json'}:") + ".*" + re.escape(said)):
        read_summary(tmp_path)
    (tmp_path / "compare.json").unlink()
    (tmp_path / "compare.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UsageError, match="symbolic link"):
        read_summary(tmp_path)
