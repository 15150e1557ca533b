"""HumanEval: canonical solutions pass, broken programs fail without harming the host, pass@k, code extraction."""
from __future__ import annotations

import ctypes
import gzip
import json
import os
import socket
import tempfile
import time
from itertools import combinations
from math import comb
from pathlib import Path

import pytest

from imtune.tasks import humaneval, run_benchmark, score_samples
from imtune.tasks.sandbox import run_programs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HUMANEVAL = DATA / "eval" / "HumanEval.jsonl.gz"
needs_data = pytest.mark.skipif(not HUMANEVAL.exists(), reason=f"{HUMANEVAL} not found (../shared/data is absent)")
PR_SET_CHILD_SUBREAPER = 36


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


def _live_children() -> set[str]:
    """Processes whose parent is this one, 'pid state (command)', after reaping the dead ones (as a subreaper, the
    sandboxes' ended processes are handed to us)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if int(ppid) == me:
                found.add(f"{entry} {state} {stat.partition(' ')[2].rpartition(')')[0]}")
    return found


def _kill_escaped(before: set[str]) -> None:
    """If the sandbox failed, end what escaped it: stop the whole tree below us first (a fork storm outruns a kill
    loop), then kill it."""
    for _ in range(100):
        escaped = {int(entry.split()[0]) for entry in _live_children() - before}
        parents = {}
        for entry in os.listdir("/proc"):
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (ValueError, OSError):
                continue
        tree, grown = set(escaped), True
        while grown:
            grown = {pid for pid, ppid in parents.items() if ppid in tree and pid not in tree}
            tree |= grown
        if not tree:
            return
        for sig in (19, 9):  # SIGSTOP, then SIGKILL
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)


@pytest.fixture
def subreaper():
    """Make this process the reaper of its orphaned descendants, so a program that escaped shows up as our child."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def hostile_completions(outside: Path, port: int) -> dict[str, str]:
    """Completions of HumanEval/0 (has_close_elements) that try to pass without solving it, or to harm the host."""
    late = f"/tmp/imtune-hostile-late-{os.getpid()}"
    return {
        "sys_exit_in_body": "    import sys\n    sys.exit(0)\n",
        "os_exit_in_body": "    import os\n    os._exit(0)\n",
        "exit_at_import": "    return True\nimport sys\nsys.exit(0)\n",
        "os_exit_at_import": "    return True\nimport os\nos._exit(0)\n",
        "atexit_exit_0": "    return True\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
        "excepthook_exit_0": "    return True\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
        "thread_exits_0_during_check": "    import time\n    time.sleep(30)\n"
                                       "import os, threading, time\n"
                                       "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
        "swallow_the_test": "    return True\ncheck = lambda candidate: None\nx = \'\'\'\n",
        "posix_system": f"    import posix\n    posix.system('mkdir -p {outside} && touch {outside}/system')\n"
                        "    return True\n",
        "reload_os": f"    import importlib, os\n    os = importlib.reload(os)\n"
                     f"    os.system('mkdir -p {outside}; echo x > {outside}/reload')\n    os._exit(0)\n",
        "execv_true": "    import os\n    os.execv('/bin/true', ['true'])\n",
        "execv_python_writes_fds": "    import os, sys\n    os.execv(sys.executable, [sys.executable, '-c', "
                                   "'import os\\nfor fd in range(64):\\n    try: os.write(fd, b\"PASS\")\\n"
                                   "    except OSError: pass'])\n",
        "fork_storm": "    import posix\n    while True:\n        try:\n            posix.fork()\n"
                      "        except OSError:\n            pass\n",
        "setsid_child_writes_later": f"    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
                                     f"        time.sleep(0.5)\n        open({late!r}, 'w').write('x')\n"
                                     f"        os.makedirs({str(outside)!r}, exist_ok=True)\n"
                                     f"        open({str(outside / 'late')!r}, 'w').write('x')\n"
                                     "        time.sleep(60)\n    os._exit(0)\n",
        "kill_parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                       "    os.kill(-1, signal.SIGKILL)\n    os.killpg(0, signal.SIGKILL)\n    return True\n",
        "write_outside": f"    import os\n    os.makedirs({str(outside)!r}, exist_ok=True)\n"
                         f"    open({str(outside / 'written')!r}, 'w').write('x')\n"
                         "    open('/usr/imtune-hostile', 'w').write('x')\n    return True\n",
        "read_system_files": "    raise ValueError(open('/etc/passwd').read() + open('/proc/1/environ').read())\n",
        "close_all_fds": "    import os\n    os.closerange(0, 4096)\n    return True\n",
        "close_fds_then_solve": "    import os\n    os.closerange(0, 4096)\n"
                                "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
                                " for b in numbers[i + 1:])\n",
        "infinite_loop": "    while True:\n        pass\n",
        "memory_bomb": "    chunks = []\n    while True:\n        chunks.append(bytearray(50 * 2**20))\n",
        "huge_allocation": "    return bytearray(2**40)\n",
        "disk_fill": "    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * 2**20)\n",
        "print_forged_pass": "    import os, sys\n    print('PASS passed 1/1 ok')\n"
                             "    sys.stderr.write('passed\\n')\n    sys.stdout.flush()\n    sys.stderr.flush()\n"
                             "    for fd in range(3, 64):\n        try:\n            os.write(fd, b'passed')\n"
                             "        except OSError:\n            pass\n    os._exit(0)\n",
        "socket": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                  "    return True\n",
        "raw_socket": f"    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
    }


@needs_data
def test_hostile_completions_score_zero_and_leave_no_trace(tmp_path, monkeypatch, subreaper):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    outside = tmp_path / "outside"
    hostile = hostile_completions(outside, server.getsockname()[1])
    late = Path(f"/tmp/imtune-hostile-late-{os.getpid()}")
    our_tmp = tmp_path / "tmpdir"  # imtune's own temporary files (stdin, stderr) go here: unnamed, so none stay
    our_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(our_tmp))
    problem = _problems()[0]
    samples = _write(tmp_path / "s.jsonl", [{"task_id": problem["task_id"], "completion": c}
                                            for c in hostile.values()])
    before = _live_children()
    result = score_samples("humaneval", str(samples), str(HUMANEVAL), limit=1, out_dir=tmp_path / "out",
                           timeout=3.0, memory_mb=256, workers=2)
    assert result["pass@1"] == 0.0 and result["samples"] == len(hostile)
    text = (tmp_path / "out" / "humaneval.samples.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    outcome = {name: row["extracted"] for name, row in zip(hostile, rows)}
    assert [name for name, row in zip(hostile, rows) if row["correct"]] == []
    assert outcome["infinite_loop"].startswith("timed out")
    assert outcome["fork_storm"].startswith("timed out")
    assert "MemoryError" in outcome["huge_allocation"]
    assert outcome["os_exit_in_body"] == "failed: FunctionError: the function's process ended before it replied"
    assert "No such file or directory: '/etc/passwd'" in outcome["read_system_files"]
    assert "root:" not in text and "PATH=" not in text  # no system file reached the samples file
    assert "File too large" in outcome["disk_fill"] or "No space left" in outcome["disk_fill"]
    with pytest.raises(BlockingIOError):  # nothing ever connected to the host's listening socket
        server.accept()
    server.close()
    time.sleep(1.0)  # the setsid child would write half a second after it started, if it still lived
    escaped = _live_children() - before
    _kill_escaped(before)
    assert not escaped, "a program's process outlived its sandbox"
    assert not outside.exists() and not late.exists() and not Path("/usr/imtune-hostile").exists()
    assert list(our_tmp.iterdir()) == []


# Forgers: completions of `add` that try to pass without adding, by attacking what records a pass rather than the host.
ADD = humaneval.Problem(("T/add",), (), "", 'def add(a, b):\n    """a + b, for numbers and for lists."""\n',
                        "def check(candidate):\n"
                        "    assert candidate(2, 3) == 5\n"
                        "    assert candidate(2, -2) == 0, 'zero'\n"
                        "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n"
                        "    assert candidate([1], [2]) == [1, 2]\n", "add")
# Reads 64 bytes from every descriptor it can open, then writes each 64-byte chunk once to every distinct file it can
# write: a token read from its pipe lands in the result pipe. `openers`: (read, write) pairs of functions -> fd.
COPY_TOKENS = """
import os
def copy_tokens(openers):
    found, targets = [], {}
    for read, write in openers:
        try:
            fd = read()
            os.set_blocking(fd, False)
            found.append(os.read(fd, 64))
        except OSError:
            pass
        try:
            fd = write()
            st = os.fstat(fd)
            targets.setdefault((st.st_dev, st.st_ino), fd)
        except OSError:
            pass
    for data in found:
        if len(data) == 64:
            for fd in targets.values():
                try:
                    os.write(fd, data)
                except OSError:
                    pass
def inherited():
    return [(lambda fd=fd: fd, lambda fd=fd: fd) for fd in range(64)]
def through_proc():  # every descriptor of every process /proc shows: its own as they are, others' reopened
    openers = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and os.access(f"/proc/{p}/fd", os.R_OK)):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if int(pid) == os.getpid():
                openers.append((lambda fd=int(fd): fd, lambda fd=int(fd): fd))
            else:
                path = f"/proc/{pid}/fd/{fd}"
                openers.append((lambda path=path: os.open(path, os.O_RDONLY | os.O_NONBLOCK),
                                lambda path=path: os.open(path, os.O_WRONLY | os.O_NONBLOCK)))
    return openers
"""
PATCH_THE_HARNESS = """    return 0
import sys
h = vars(sys.modules["__main__"])
if "token_fd" in h:  # the single-process harness: its exit path now records a pass
    real = h["_exit"]
    h["_exit"] = lambda code: (h["_write"](h["result_fd"], h["_read"](h["token_fd"], 64)), real(0))
for name in ("answer", "receive", "check", "send", "main"):  # the two-process one's code, in this process
    if name in h:
        h[name] = lambda *args, **kwargs: None
"""
ALWAYS_EQUAL = """    class Yes:
        __eq__ = lambda self, other: True
        __ne__ = lambda self, other: False
        __sub__ = __rsub__ = lambda self, other: self
        __abs__ = lambda self: 0
        __bool__ = lambda self: True
        __hash__ = object.__hash__
    return Yes()
"""
# The function's own side writes this reply text instead of the one for its value (5, on every call).
RAW_REPLY = "    return 5\nimport sys\nsys.modules['__main__'].literal = lambda message: {!r}\n"
FORGERS = {
    "harness state": {
        "patch_the_harness": PATCH_THE_HARNESS,
        "builtins_exec_does_nothing": "    return 0\nimport builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",
        "builtins_compile_compiles_pass": "    return 0\nimport builtins\nreal = builtins.compile\n"
                                          "builtins.compile = lambda *a, **k: real('pass', '<forged>', 'exec')\n",
        "builtins_assertion_error": "    return 0\nimport builtins\n"
                                    "builtins.AssertionError = type('AssertionError', (BaseException,), {})\n",
        "sys_exit_0_in_call": "    import sys\n    sys.exit(0)\n",
        "os_exit_0_at_import": "    return 0\nimport os\nos._exit(0)\n",
        "os_exit_0_in_call": "    import os\n    os._exit(0)\n",
    },
    "forged token or result": {
        "copy_the_token_between_inherited_fds": "    return 0\n" + COPY_TOKENS + "copy_tokens(inherited())\n",
        "copy_the_token_then_exit_0": "    copy_tokens(inherited())\n    os._exit(0)\n" + COPY_TOKENS,
        "print_a_forged_token_and_pass": "    import os, sys\n    print('passed', 'a' * 64)\n"
                                         "    sys.stderr.write('passed\\n')\n    sys.stdout.flush()\n"
                                         "    sys.stderr.flush()\n    os._exit(0)\n",
        "write_replies_ahead": "    import os\n    for fd in range(3, 64):\n        try:\n"
                               "            os.write(fd, b\"('ok', True)\\n\" * 100)\n        except OSError:\n"
                               "            pass\n    return 0\n",
    },
    "proc of the checker": {
        "fds_found_through_proc": "    return 0\n" + COPY_TOKENS + "copy_tokens(through_proc())\n",
    },
    "always equal": {
        "object_equal_to_everything": ALWAYS_EQUAL,
        "int_subclass_equal_to_everything": "    class Yes(int):\n        __eq__ = lambda self, other: True\n"
                                            "        __hash__ = int.__hash__\n    return Yes(0)\n",
        "list_subclass_equal_to_everything": "    class Yes(list):\n        __eq__ = lambda self, other: True\n"
                                             "    return Yes()\n",
    },
    "types outside the literals": {
        "object_equal_to_everything": ALWAYS_EQUAL,
        "bytes": "    return b'5'\n",
        "complex": "    return complex(a + b) if not isinstance(a, list) else a + b\n",
        "generator": "    return (x for x in [a + b])\n",
        "frozenset": "    return frozenset([a + b]) if not isinstance(a, list) else a + b\n",
        "raw_reply_complex": RAW_REPLY.format("('ok', 5j)"),
        "raw_reply_bytes": RAW_REPLY.format("('ok', b'5')"),
        "raw_reply_call": RAW_REPLY.format("('ok', __import__('os').getpid())"),
        "raw_reply_too_long": RAW_REPLY.format("('ok', '" + "x" * 9 * 2**20 + "')"),
    },
    "hangs or eats memory": {
        "hangs_on_the_second_call": "    import time\n    if a == 2 and b == -2:\n        time.sleep(3600)\n"
                                    "    return a + b\n",
        "endless_reply": "    import os\n    for fd in range(3, 64):\n        try:\n            while True:\n"
                         "                os.write(fd, b'[1, ' * 4096)\n        except OSError:\n            pass\n",
        "eats_memory": "    chunks = []\n    while True:\n        chunks.append(bytearray(2**24))\n",
    },
}


def _forged(kind: str) -> dict[str, str]:
    """The outcome of each forger of one kind, scored as HumanEval scores completions ('PASSED ...' if it passed)."""
    forgers = FORGERS[kind]
    verdicts = humaneval.score([(ADD, "    return a + b\n")] + [(ADD, c) for c in forgers.values()],
                               humaneval.Options(timeout=3.0, memory_mb=256, workers=2))
    assert verdicts[0].correct, verdicts[0]  # the check passes a right answer
    return {name: ("PASSED " if v.correct else "") + v.extracted for name, v in zip(forgers, verdicts[1:])}


def _passed(outcome: dict[str, str]) -> list[str]:
    return [name for name, text in outcome.items() if text.startswith("PASSED")]


def test_completions_that_tamper_with_the_harness_in_process_fail():
    outcome = _forged("harness state")
    assert not _passed(outcome), outcome
    assert outcome["builtins_exec_does_nothing"] == "failed: AssertionError:"  # the check ran, on a wrong answer


def test_forged_tokens_and_results_fail():
    outcome = _forged("forged token or result")
    assert not _passed(outcome), outcome


def test_the_checker_is_out_of_reach_through_proc():
    outcome = _forged("proc of the checker")
    assert not _passed(outcome), outcome


def test_objects_equal_to_everything_fail():
    outcome = _forged("always equal")
    assert not _passed(outcome), outcome
    assert "TypeError: a value of type Yes cannot be sent" in outcome["object_equal_to_everything"]
    assert outcome["int_subclass_equal_to_everything"] == "failed: AssertionError:"  # crossed as the plain 0


def test_results_outside_the_literals_fail_with_a_reason():
    outcome = _forged("types outside the literals")
    assert not _passed(outcome), outcome
    for name in ("bytes", "complex", "generator", "frozenset"):
        assert "cannot be sent" in outcome[name], outcome
    for name in ("raw_reply_complex", "raw_reply_bytes", "raw_reply_call"):
        assert "FunctionError: an unreadable reply" in outcome[name], outcome
    assert outcome["raw_reply_too_long"] == "failed: FunctionError: the reply is too long"


def test_functions_that_hang_or_eat_memory_fail_and_the_run_ends():
    started = time.monotonic()
    outcome = _forged("hangs or eats memory")
    assert time.monotonic() - started < 20
    assert outcome["hangs_on_the_second_call"] == "timed out: after 3 s"
    assert outcome["endless_reply"].startswith(("failed: FunctionError", "timed out")), outcome
    assert outcome["eats_memory"] == "failed: MemoryError:"


@needs_data
def test_an_object_equal_to_everything_solves_no_humaneval_problem(tmp_path):
    """Where the check gets the function's result as it is (OpenAI's harness, imtune before), this scores 157/164."""
    samples = _write(tmp_path / "s.jsonl", [{"task_id": p["task_id"], "completion": ALWAYS_EQUAL}
                                            for p in _problems()])
    result = score_samples("humaneval", str(samples), str(HUMANEVAL), workers=2)
    assert result["n"] == 164 and result["solved"] == 0


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
    from imtune.data.templates import Renderer
    from imtune.model.generate import GenerationConfig
    from imtune.model.models import load_model, load_tokenizer

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
