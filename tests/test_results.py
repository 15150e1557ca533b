"""imtune.results: compare.json as typed records — a written object reads back into the records and out again key
for key; a version-1 file (one run per arm) reads as one run per arm; what imtune did not write is refused with what
is wrong."""
from __future__ import annotations

import copy

import pytest

from imtune.results import CompareResult, Interval

IV = {"value": -0.1, "low": -0.2, "high": -0.05}
V2 = {"version": 2, "dir": "cmp", "commands": [{"argv": ["imtune", "compare"], "time": "t", "cwd": "/w"}],
      "settings": {"base_config": {"model": "random:tiny", "seed": 42}, "seeds": [0, 1], "reference": "it"},
      "data": {"n_train": 4},
      "arms": [{"spec": s, "name": s, "dir": f"arms/{s}", "overrides": {"loss": s},
                "runs": [{"seed": k, "dir": f"arms/{s}/seed-{k}", "results": {"gap": 0.1 * k}} for k in (0, 1)],
                "results": {"gap": 0.05}} for s in ("it", "im")],
      "evidence": {"reference": "it", "method": "bootstrap", "level": 0.95, "n_seeds": 2, "n_examples": {"heldout": 9},
                   "measures": {"gap": {"values": {"it": {"value": 0.3}, "im": {"value": 0.2}},
                                        "differences": {"it": {"value": 0.0, "low": 0.0, "high": 0.0}, "im": IV},
                                        "per_seed": {"it": [0.3, 0.3], "im": [0.2, 0.2]},
                                        "label": "train/held-out gap (final)", "better": "lower"}}},
      "versions": {"imtune": "0.1.0"}, "verdict": {"version": 1, "headline": "h"}, "time": {"total": 1.0},
      "memory": {"report": 100.0}}


def test_a_written_compare_json_reads_back_into_records_and_out_unchanged():
    r = CompareResult.from_json(copy.deepcopy(V2))
    assert r.to_json() == V2
    assert [a.spec for a in r.arms] == ["it", "im"] and r.seeds == [0, 1] and r.cwd == "/w"
    assert [(a.name, run.seed, run.dir) for a, run in r.runs()][1] == ("it", 1, "arms/it/seed-1")
    gap = r.evidence.measures["gap"]
    assert gap.differences["im"] == Interval(-0.1, -0.2, -0.05) and gap.differences["im"].excludes_zero()
    assert not gap.differences["it"].excludes_zero() and gap.values["im"].low is None
    assert r.run_label(r.arms[1], r.arms[1].runs[0]) == "im seed 0"


def test_a_version_1_file_has_one_run_per_arm():
    v1 = {"settings": {"base_config": {"seed": 7}},
          "arms": [{"spec": "it", "name": "it", "dir": "arms/it", "results": {"gap": 0.2}}]}
    r = CompareResult.from_json(v1)
    assert r.version == 1 and r.arms[0].runs[0].seed == 7 and r.arms[0].runs[0].dir == "arms/it"
    assert r.evidence is None and r.run_label(r.arms[0], r.arms[0].runs[0]) == "it"


@pytest.mark.parametrize("change, said", [
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d["settings"].pop("base_config"), '"settings" without a "base_config"'),
    (lambda d: d.update(arms=[]), '"arms" is not a non-empty list'),
    (lambda d: d["arms"][0].pop("name"), 'an arm without a "name"'),
    (lambda d: d["arms"][1]["runs"][0].pop("dir"), "arm 'im': a run without a \"dir\""),
    (lambda d: d["arms"][0].update(results=[1]), "arm 'it': \"results\" that are not an object"),
    (lambda d: d.update(evidence="x"), '"evidence" is not an object'),
    (lambda d: d["evidence"]["measures"].update(gap="x"), "measure: expected an object, got str"),
    (lambda d: d["arms"][0]["runs"][0]["results"].update(best=[1]), "bestscore: expected an object, got list"),
])
def test_what_imtune_did_not_write_is_refused_with_what_is_wrong(change, said):
    d = copy.deepcopy(V2)
    change(d)
    with pytest.raises(ValueError, match=said.replace("(", r"\(")):
        CompareResult.from_json(d)
    with pytest.raises(ValueError, match="not a JSON object"):
        CompareResult.from_json([V2])


def test_scores_read_every_measure_and_give_the_object_back():
    from imtune.results import Scores

    run = {"train": {"n": 8, "output_loss": 1.5, "output_tokens": 40, "instruction_loss": None, "truncated": 0},
           "heldout": {"n": 5, "output_loss": 2.0, "scored": "in training (step 4)"}, "gap": None,
           "best": {"step": 2, "loss": 1.9, "selected_on": "val_output_loss",
                    "heldout": {"n": 5, "output_loss": 1.95}},
           "bleu": {"n": 4, "corpus_bleu": 12.5, "sentence_bleu": [10.0, 15.0], "reference_words_mean": 3.0,
                    "sentence_bleu_mean": 12.5},
           "exact_match": {"n": 2, "accuracy": 0.5, "correct": [True, False]},
           "bench": {"gsm8k": {"metric": "exact_match", "value": 0.25, "n": 4},
                     "alpacaeval": {"metric": "win rate", "value": 0.5, "n": 4, "standard_error": None,
                                    "judge": "j", "wins": 2}},
           "seconds": 1.0, "per_example": {"heldout": {"source": ["a:1"]}}}
    s = Scores.from_json(run)
    assert s.to_json() == run
    assert s.gap is None and s.best.step == 2 and s.best.heldout.output_loss == 1.95
    assert s.bleu.sentence_bleu == [10.0, 15.0] and not s.bleu.meaningful()  # 3 words: 4-gram BLEU says nothing
    assert s.exact_match.correct == [True, False] and s.bench["alpacaeval"].judge == "j"
    assert s.bench["gsm8k"].standard_error is None and s.train.more["output_tokens"] == 40
    assert Scores.from_json({}).to_json() == {} and not Scores.from_json({})
