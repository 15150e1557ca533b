"""Per-class loss evaluation agrees with a naive computation from model(...).logits, and `imtune eval` on a run
directory finds its training data, computes the gap and writes RUN/eval/."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tokenize
from imtune.cli import main
from imtune.data.templates import Renderer
from imtune.data.weights import loss_spec
from imtune.evaluate.loss import evaluate_loss
from imtune.types import CLASSES, Conversation, Message

CONVS = [
    Conversation((Message("system", "You are terse."), Message("user", "What is 2+2?"), Message("assistant", "4"))),
    Conversation((Message("user", "Write a haiku about autumn leaves falling on a quiet pond."),
                  Message("assistant", "Red leaves drift and fall\nripples spread on the pond\nthe year exhales"))),
    Conversation((Message("user", "Hi"), Message("assistant", "Hello! How can I help?"),
                  Message("user", "Count to five."), Message("assistant", "1, 2, 3, 4, 5."))),
    Conversation((Message("user", "Translate 'cat' to German."), Message("assistant", "Katze"))),
    Conversation((Message("user", "One word for happy?"), Message("assistant", "Glad."))),
]


@pytest.fixture(scope="module")
def tiny():
    from imtune.model.models import load_model, load_tokenizer

    return load_model("random:tiny"), load_tokenizer("random:tiny")


def naive(model, tok, renderer, convs, max_length=None):
    """Per-class (sum of NLL, count), one example at a time, from full logits."""
    sums, counts = [0.0] * len(CLASSES), [0] * len(CLASSES)
    examples, _ = tokenize([renderer.render(c) for c in convs], tok, loss_spec("all"), max_length, "truncate")
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids.tolist()])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t in range(1, len(ex.input_ids)):
                sums[ex.classes[t]] += -logp[t - 1, ex.input_ids[t]].item()
                counts[ex.classes[t]] += 1
    return sums, counts


@pytest.mark.parametrize("template", ["tulu", None])
def test_per_class_nll_matches_naive_logits(tiny, template):
    model, tok = tiny
    renderer = Renderer(template, tok)
    res = evaluate_loss(model, tok, renderer, CONVS, batch_size=2)  # 2: padded batches of unequal lengths
    sums, counts = naive(model, tok, renderer, CONVS)
    assert res["n"] == len(CONVS)
    for i, c in enumerate(CLASSES):
        got = res["per_class"][c]
        assert got["tokens"] == counts[i]
        if counts[i]:
            assert got["nll"] == pytest.approx(sums[i] / counts[i], abs=1e-4)
            assert got["ppl"] == pytest.approx(math.exp(got["nll"]))
        else:
            assert got["nll"] is None
    for group, members in {"output": ("assistant", "eot"), "instruction": ("user", "system")}.items():
        idx = [CLASSES.index(m) for m in members]
        assert res[group]["tokens"] == sum(counts[i] for i in idx) > 0
        assert res[group]["nll"] == pytest.approx(sum(sums[i] for i in idx) / res[group]["tokens"], abs=1e-4)
    assert res["per_class"]["system"]["tokens"] > 0 and res["per_class"]["eot"]["tokens"] == 6


def test_truncation_is_counted_and_matches_naive(tiny):
    model, tok = tiny
    renderer = Renderer("tulu", tok)
    res = evaluate_loss(model, tok, renderer, CONVS, max_length=12, batch_size=3)
    assert res["truncated"] > 0 and res["n"] == len(CONVS) and res["tokens"] <= 12 * len(CONVS)
    sums, counts = naive(model, tok, renderer, CONVS, max_length=12)
    i = CLASSES.index("user")
    assert res["per_class"]["user"]["nll"] == pytest.approx(sums[i] / counts[i], abs=1e-4)
    dropped = evaluate_loss(model, tok, renderer, CONVS, max_length=12, truncation="drop", limit=4)
    assert dropped["n"] + len(dropped["skipped"]) == 4 and dropped["truncated"] == 0


def _write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c.messages]})
                            + "\n" for c in convs))


def test_eval_command_on_a_run_directory(tiny, tmp_path, capsys):
    model, tok = tiny
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    _write_jsonl(train, CONVS[:3])
    _write_jsonl(heldout, CONVS[3:])
    # As imtune train writes it (TrainConfig): the training data, how it was read, and the held-out eval_data.
    (run / "config.yaml").write_text(f"data: {train}\nlimit: 2\nmax_length: 64\ntruncation: drop\nloss: im\n"
                                     f"eval_data: {heldout}\n")
    (run / ".imtune").write_text('{"kind": "run", "version": 1}\n')  # imtune's mark: eval writes into RUN/eval
    assert main(["eval", str(run), "--generate", "--bleu-train", "--max-new-tokens", "3",
                 "--json", str(tmp_path / "copy.json")]) == 0
    printed = capsys.readouterr().out
    assert "output (assistant+eot)" in printed and "gap" in printed
    res = json.loads((run / "eval" / "eval-heldout.json").read_text())
    assert res == json.loads((tmp_path / "copy.json").read_text())
    assert res["train"]["data"] == str(train) and res["train"]["n"] == 2 and res["heldout"]["n"] == 2
    assert res["heldout"]["data"] == str(heldout) and res["max_length"] == 64 and res["truncation"] == "drop"
    assert res["gap"]["output"] == pytest.approx(res["heldout"]["output"]["nll"] - res["train"]["output"]["nll"])
    # The saved run reloads to the same weights, so its numbers equal the in-memory model's.
    direct = evaluate_loss(model, tok, Renderer(None, tok), CONVS[3:], max_length=64)
    assert res["heldout"]["output"]["nll"] == pytest.approx(direct["output"]["nll"], abs=1e-5)
    rows = [json.loads(line) for line in (run / "eval" / "generations-heldout.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["Katze", "Glad."]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Translate 'cat' to German."}]
    assert res["bleu_train"]["n"] == 2 and 0 <= res["bleu_train"]["corpus_bleu"] <= 100
    assert (run / "eval" / "bleu-train-train.jsonl").exists()
    md = (run / "eval" / "eval-heldout.md").read_text()
    assert "| output (assistant+eot) |" in md and "Memorisation" in md


def test_eval_command_usage_errors(tmp_path, capsys):
    assert main(["eval", "random:tiny"]) == 2
    assert "--data" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    _write_jsonl(data, CONVS[:1])
    assert main(["eval", "random:tiny", "--data", str(data), "--generate"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "random:tiny", "--model", "default", "--data", str(data)]) == 2
