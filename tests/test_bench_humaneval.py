"""HumanEval: canonical solutions pass, broken programs fail without harming the host, pass@k, code extraction."""
from __future__ import annotations

import gzip
import json
import os
import socket
import time
from itertools import combinations
from math import comb
from pathlib import Path

import pytest

from imtune.bench import humaneval, run_benchmark, score_samples
from imtune.bench.sandbox import network_isolation, run_programs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HUMANEVAL = DATA / "eval" / "HumanEval.jsonl.gz"
needs_data = pytest.mark.skipif(not HUMANEVAL.exists(), reason=f"{HUMANEVAL} not found (../shared/data is absent)")


def _problems() -> list[dict]:
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@needs_data
def test_canonical_solutions_all_pass(tmp_path):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": p["task_id"], "completion": p["canonical_solution"]}
                                            for p in _problems()])
    result = score_samples("humaneval", str(samples), str(HUMANEVAL), workers=2)
    assert result["n"] == 164 and result["samples"] == 164
    assert result["pass@1"] == 1.0 and result["solved"] == 164


@needs_data
def test_broken_programs_fail_without_hurting_the_host(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    pid_file = tmp_path / "loop.pid"
    body = {
        "none": "    return None\n",
        "loop": f"    import os\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n    while True:\n        pass\n",
        "bomb": "    chunks = []\n    while True:\n        chunks.append(bytearray(50 * 2**20))\n",
        "huge": "    return bytearray(2**40)\n",
        "socket": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "raw_socket": f"    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
        "urllib": "    import urllib.request\n    urllib.request.urlopen('http://example.com', timeout=1)\n",
        "fork": "    import os\n    os.fork()\n",
    }
    problems = _problems()[: len(body)]
    samples = _write(tmp_path / "s.jsonl", [{"task_id": p["task_id"], "completion": b}
                                            for p, b in zip(problems, body.values())])
    start = time.monotonic()
    result = score_samples("humaneval", str(samples), str(HUMANEVAL), limit=len(body), out_dir=tmp_path / "out",
                           timeout=2.0, memory_mb=256, workers=2)
    assert time.monotonic() - start < 45
    assert result["pass@1"] == 0.0 and result["n"] == len(body)
    rows = [json.loads(line) for line in (tmp_path / "out" / "humaneval.samples.jsonl").read_text().splitlines()]
    outcome = {name: row["extracted"] for name, row in zip(body, rows)}
    assert all(not row["correct"] for row in rows)
    assert outcome["loop"].startswith("timed out")
    assert "MemoryError" in outcome["huge"]
    assert outcome["bomb"].startswith("failed")
    assert "disabled in the imtune sandbox" in outcome["fork"]
    with pytest.raises(BlockingIOError):  # nothing ever connected to the host's listening socket
        server.accept()
    server.close()
    loop_pid = int(pid_file.read_text())  # the endless program was killed, not left running
    with pytest.raises(ProcessLookupError):
        os.kill(loop_pid, 0)


def test_network_namespace_used_when_available():
    # Documented behaviour: with unshare available to this user, programs get an empty network namespace.
    prefix = network_isolation()
    assert prefix == () or prefix[1] in ("-n", "-rn")
    [outcome] = run_programs(["import socket, sys\nprint(socket.if_nameindex(), file=sys.stderr)\nraise SystemExit(1)"])
    if prefix:
        assert "lo" in outcome.detail and "eth" not in outcome.detail


def test_pass_at_k_matches_the_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # and by enumeration: the share of k-subsets of n samples that contain a correct one
    outcomes = [True, False, False, True, False]
    subsets = list(combinations(outcomes, 2))
    assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert humaneval.pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100))


def test_summarize_reports_k_up_to_the_samples_per_problem():
    a, b = (humaneval.Problem((t,), (), "", "", "", "f") for t in ("A", "B"))
    pairs = [(a, "")] * 3 + [(b, "")] * 3
    verdicts = [humaneval.Verdict(x, "") for x in (True, False, False, False, False, False)]
    out = humaneval.summarize(pairs, verdicts, humaneval.Options(k=(1, 2, 10)))
    assert set(out) == {"pass@1", "pass@2", "solved"}
    assert out["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["pass@2"] == pytest.approx((1 - comb(2, 2) / comb(3, 2)) / 2)
    assert out["solved"] == 1


PROMPT = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Add."""\n'
P = humaneval.Problem(("T/0",), (), "", PROMPT, "def check(f):\n    assert f(2, 3) == 5\n", "add")


@pytest.mark.parametrize("reply", [
    "Here you go:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nDone.",  # full function
    "```python\nimport math\n\ndef add(a, b):\n    return a + b\n",  # unclosed fence, own import
    "```\nreturn a + b\n```",  # body only, not indented: indented under the prompt's signature
    "    return a + b",  # body only, no fence
    "```python\nprint('example')\n```\n```python\ndef add(a, b):\n    return b + a\n```",  # the block with the def
])
def test_postprocess_makes_a_program_that_runs(reply):
    completion = humaneval.postprocess(P, reply)
    [outcome] = run_programs([humaneval.program(P, completion)], timeout=5)
    assert outcome.passed, (completion, outcome)


def test_postprocess_keeps_the_standard_form():
    assert humaneval.postprocess(P, "    return a + b\n") == "    return a + b\n"
    assert humaneval.postprocess(P, "def add(a, b):\n    return a + b") == "\ndef add(a, b):\n    return a + b\n"


@needs_data
def test_generation_run_through_the_python_api(tmp_path):
    from imtune.generate import GenerationConfig
    from imtune.models import load_model, load_tokenizer
    from imtune.templates import Renderer

    tok = load_tokenizer("random:tiny")
    model = load_model("random:tiny")
    result = run_benchmark("humaneval", model, tok, Renderer("tulu", tok), str(HUMANEVAL), limit=2,
                           gen_cfg=GenerationConfig(max_new_tokens=8), out_dir=tmp_path, timeout=5.0)
    assert result["benchmark"] == "humaneval" and result["n"] == 2 and "pass@1" in result
    rows = [json.loads(line) for line in (tmp_path / "humaneval.samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert {"prompt", "completion", "reference", "correct"} <= set(rows[0])
    assert json.loads((tmp_path / "humaneval.json").read_text())["n"] == 2
    # the samples file is itself a standard samples file: scoring it again agrees
    again = score_samples("humaneval", str(tmp_path / "humaneval.samples.jsonl"), str(HUMANEVAL), limit=2)
    assert again["pass@1"] == result["pass@1"]
