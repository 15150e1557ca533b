"""imtune compare end to end on random:tiny: arms parse, every arm gets its run directory, compare.json and the report
agree with metrics.jsonl, and a re-run skips finished arms. LIMA (../shared/data) and synthetic data (no files)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.experiments.arms import parse_arm, parse_arms
from imtune.results import CompareResult
from imtune.rundir.read import metrics as read_metrics
from imtune.types import UsageError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIMA = SHARED / "train" / "lima.jsonl"


def test_arms_parse_into_config_overrides_and_safe_names():
    assert parse_arm("it").overrides == {"loss": "it", "prompt_weight": None, "neftune_alpha": 0.0, "kl_coef": 0.0}
    w = parse_arm("weighted:0.1")
    assert (w.name, w.overrides["loss"], w.overrides["prompt_weight"]) == ("weighted-0.1", "weighted", 0.1)
    n = parse_arm("im+neftune:5")
    assert (n.name, n.overrides["loss"], n.overrides["neftune_alpha"]) == ("im+neftune-5", "im", 5.0)
    k = parse_arm("it+kl:1+neftune:2")
    assert (k.overrides["kl_coef"], k.overrides["neftune_alpha"]) == (1.0, 2.0)
    assert [a.name for a in parse_arms("it, im,all")] == ["it", "im", "all"]
    for bad in ("itt", "weighted", "weighted:-1", "im+noise:3", "im+kl", "im:2", "weighted:x"):
        with pytest.raises(UsageError, match="valid arms: it, im, all or weighted"):
            parse_arm(bad)
    with pytest.raises(UsageError, match="twice"):
        parse_arms("it,im,it")


def _md_tables(md: str) -> dict[str, list[list[str]]]:
    """First-column-keyed tables of report.md: the header's second cell -> rows (cells stripped)."""
    tables, cur = {}, None
    for line in md.splitlines():
        if line.startswith("| ") and cur is None:
            cur = [[c.strip() for c in line.strip("|").split(" | ")]]
        elif line.startswith("|---"):
            continue
        elif line.startswith("| ") and cur is not None:
            cur.append([c.strip() for c in line.strip("|").split(" | ")])
        elif cur is not None:
            tables[" / ".join(cur[0][:3])] = cur
            cur = None
    return tables


def check_report_matches_files(out: Path) -> dict:
    """The numbers in report.md equal those in compare.json and in each arm's metrics.jsonl; compare.json reads back
    into its typed record and out again unchanged (imtune.results)."""
    summary = json.loads((out / "compare.json").read_text())
    assert CompareResult.from_json(summary).to_json() == summary
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    tables = _md_tables(md)
    results = next(t for k, t in tables.items() if k.startswith("arm / train output loss"))
    for row, arm in zip(results[1:], summary["arms"]):
        r = arm["results"]
        assert row[:4] == [arm["spec"], f"{r['train']['output_loss']:.4f}", f"{r['heldout']['output_loss']:.4f}",
                           f"{r['gap']:.4f}"]
        assert r["gap"] == pytest.approx(r["heldout"]["output_loss"] - r["train"]["output_loss"])
    points = next(t for k, t in tables.items() if k.startswith("arm / seed / step"))
    expected = []
    runs = [(arm, run) for arm in summary["arms"] for run in arm["runs"]]
    for arm, run in runs:
        for rec in read_metrics(out / run["dir"], kind="eval"):
            expected.append([arm["spec"], str(run["seed"]), str(rec["step"]), f"{rec['train_output_loss']:.4f}",
                             f"{rec['eval_output_loss']:.4f}"])
    assert [[r[0], r[1], r[2], r[4], r[5]] for r in points[1:]] == expected
    training = next(t for k, t in tables.items() if k.startswith("arm / seed / steps"))
    for row, (_arm, run) in zip(training[1:], runs):
        last = read_metrics(out / run["dir"])[-1]
        assert row[2] == str(last["step"]) and row[6] == f"{last['loss_output']:.4f}"
    # The final held-out loss of the saved model equals the trainer's last eval point (same examples, same mask).
    for _arm, run in runs:
        last_eval = read_metrics(out / run["dir"], kind="eval")[-1]
        assert run["results"]["heldout"]["output_loss"] == pytest.approx(last_eval["eval_output_loss"], rel=1e-4)
    # The arm's numbers are the means over its seeds.
    for arm in summary["arms"]:
        ho = [run["results"]["heldout"]["output_loss"] for run in arm["runs"]]
        assert arm["results"]["heldout"]["output_loss"] == pytest.approx(sum(ho) / len(ho))
    # Self-contained HTML: every image inline, nothing fetched.
    assert html.count("src='data:image/png;base64,") == len(re.findall(r"!\[", md)) >= 2
    assert not re.search(r"src=['\"](?!data:)", html)
    for png in ("loss_curves.png", "gap.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # What it was made with: recorded by compare, shown in the report; the headline opens both files.
    v = summary["versions"]
    assert v["model"]["name"] == summary["settings"]["base_config"]["model"] and v["model"]["fingerprint"]
    assert f"torch {v['torch']} · transformers {v['transformers']}" in md
    assert md.splitlines()[2] == f"**{summary['verdict']['headline']}**" and summary["verdict"]["headline"] in html
    return summary


@pytest.mark.slow
def test_compare_three_arms_on_lima_and_rerun_skips(tmp_path, capsys):
    if not LIMA.exists():
        pytest.skip(f"{LIMA} is absent: the shared reference data is not beside this checkout")
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(LIMA), "--limit", "24", "--max-length", "256", "--truncation", "truncate",
            "--model", "random:tiny", "--arms", "it,im,weighted:0.1", "--max-steps", "2", "--batch-size", "2",
            "--eval-every", "1", "--eval-train-sample", "8", "--bleu-samples", "2", "--max-new-tokens", "4",
            "--lr", "1e-3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr()
    for name in ("it", "im", "weighted-0.1"):
        run = out / "arms" / name / "seed-42"
        for f in ("config.yaml", "metrics.jsonl", "data_stats.json", "chat_template.jinja", "DONE", "final",
                  "eval/compare.json"):
            assert (run / f).exists(), run / f
    assert (out / "data" / "train.jsonl").exists() and (out / "data" / "heldout.jsonl").exists()
    summary = check_report_matches_files(out)
    assert [a["spec"] for a in summary["arms"]] == ["it", "im", "weighted:0.1"]
    cfgs = {a["name"]: (out / a["dir"] / "seed-42" / "config.yaml").read_text() for a in summary["arms"]}
    assert "loss: weighted" in cfgs["weighted-0.1"] and "prompt_weight: 0.1" in cfgs["weighted-0.1"]
    # Same budget and data for every arm: the same steps, and the first eval (step 0, same start) agrees exactly.
    evals = {a: read_metrics(out / "arms" / a / "seed-42", kind="eval") for a in cfgs}
    assert {len(read_metrics(out / "arms" / a / "seed-42")) for a in cfgs} == {2}
    assert len({json.dumps(e[0], sort_keys=True) for e in evals.values()}) == 1
    assert summary["data"]["n_heldout"] == 2 and summary["data"]["split"]["kind"] == "split"
    assert summary["data"]["stats"]["recommendation"]["mode"] in ("it", "im", "weighted")
    assert "held-out output loss" in summary["verdict"]["text"]
    assert "arm" in first.out and "report:" in first.out and "it" in first.out

    # Re-run: nothing retrained or re-evaluated.
    run = lambda a: out / "arms" / a / "seed-42"  # noqa: E731
    stamps = {a: ((run(a) / "DONE").stat().st_mtime_ns, (run(a) / "final").stat().st_mtime_ns,
                  (run(a) / "metrics.jsonl").read_text()) for a in cfgs}
    assert main(argv) == 0
    again = capsys.readouterr()
    assert again.err.count("already trained") == 3 and again.err.count("already evaluated") == 3
    assert stamps == {a: ((run(a) / "DONE").stat().st_mtime_ns, (run(a) / "final").stat().st_mtime_ns,
                          (run(a) / "metrics.jsonl").read_text()) for a in cfgs}
    assert len(json.loads((out / "compare.json").read_text())["commands"]) == 2
    check_report_matches_files(out)

    # A re-run with another training setting never mixes arms: it stops and says what differs.
    assert main([*argv[:-2], "--lr", "2e-3", "--out", str(out)]) == 2
    assert "lr: 0.001 -> 0.002" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_on_synthetic_data_with_exact_match_and_modifiers(tmp_path, capsys):
    from imtune.data.synth import synthesize, write_jsonl

    train, heldout = synthesize("lookup", 10, 10.0, seed=0, heldout=4)
    data = write_jsonl(tmp_path / "lookup.jsonl", train, "lookup", 0, "train")
    held = write_jsonl(tmp_path / "lookup.heldout.jsonl", heldout, "lookup", 0, "heldout")
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data), "--eval-data", str(held), "--model", "random:tiny",
                 "--arms", "it,im+neftune:5", "--max-steps", "2", "--batch-size", "2", "--max-length", "256",
                 "--bleu-samples", "0", "--exact-match", "4", "--max-new-tokens", "4", "--no-progress",
                 "--val-fraction", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    summary = check_report_matches_files(out)
    assert summary["data"]["split"]["kind"] == "given" and summary["data"]["n_heldout"] == 4
    cfg = (out / "arms" / "im+neftune-5" / "seed-42" / "config.yaml").read_text()
    assert "loss: im" in cfg and "neftune_alpha: 5.0" in cfg
    for arm in summary["arms"]:
        em = arm["results"]["exact_match"]
        assert em["n"] == 4 and em["accuracy"] == sum(em["correct"]) / 4
        assert "bleu" not in arm["results"]
    assert "held-out exact match" in summary["verdict"]["text"]
    assert (out / "plots" / "scores.png").exists()
    # The report can be rebuilt from the files alone.
    (out / "report.md").unlink()
    assert main(["compare", "--report-only", str(out)]) == 0
    assert (out / "report.md").exists()
    check_report_matches_files(out)


def test_compare_refuses_per_arm_flags(capsys):
    assert main(["compare", "--data", "x.jsonl", "--loss", "im"]) == 2
    assert "--arms" in capsys.readouterr().err
    assert main(["compare", "--data", "x.jsonl", "--arms", "im,bogus"]) == 2
    assert "valid arms" in capsys.readouterr().err


def test_demo_threads_follow_the_free_cores(monkeypatch):
    """The demo asks torch for all cores on an idle CPU and leaves busy cores alone (oversubscribed OpenMP threads
    ran ~5x slower on 2 cores); the busy share is measured now, not a lagging load average."""
    from imtune.commands import demo

    busy = demo.cores_busy(0.1)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    for measured, want in ((0.1, None), (0.7, None), (1.0, 1), (1.9, 1), (5.0, 1)):
        monkeypatch.setattr(demo, "cores_busy", lambda seconds=1.0, m=measured: m)
        assert demo.pick_threads() == want, measured
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(demo, "cores_busy", lambda seconds=1.0: 4.0)
    assert demo.pick_threads() == 12


@pytest.mark.slow
def test_compare_passes_role_map_and_system_prompt_to_its_data_and_evaluation(tmp_path, capsys, monkeypatch):
    """--role reaches compare's own loading of the data (roles `person`/`bot` are refused without it), and
    --system-prompt reaches every renderer of the run: compare's data stats, the trainer and the final evaluation
    (a random model's loss barely depends on the context, so the renderers are watched, not the numbers)."""
    import inspect

    from imtune.data.templates import Renderer

    init, seen = Renderer.__init__, []

    def watched(self, *args, **kwargs):
        seen.append(inspect.signature(init).bind(self, *args, **kwargs).arguments.get("system_prompt", "default"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(Renderer, "__init__", watched)
    recs = [{"messages": [{"role": "person", "content": f"Say the word number {i} twice please."},
                          {"role": "bot", "content": f"word {i} word {i}"}]} for i in range(12)]
    data = tmp_path / "bots.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data), "--model", "random:tiny", "--arms", "it,im", "--max-steps", "1",
            "--batch-size", "4", "--max-length", "128", "--bleu-samples", "2", "--max-new-tokens", "2",
            "--heldout-fraction", "0.34", "--no-progress", "--out", str(out)]
    assert main([*argv, "--system-prompt", "none"]) == 2  # the roles are not known without --role
    assert "--role" in capsys.readouterr().err
    seen.clear()
    assert main([*argv, "--system-prompt", "none", "--role", "person=user,bot=assistant"]) == 0
    capsys.readouterr()
    summary = check_report_matches_files(out)
    assert summary["settings"]["base_config"]["system_prompt"] == "none"
    assert summary["data"]["n_train"] + summary["data"]["n_heldout"] == 12
    assert len(seen) >= 3 and set(seen) == {"none"}, seen
