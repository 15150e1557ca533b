"""The sandbox: a pass needs the harness's token, the program sees almost nothing of the host, and without
bubblewrap model code is refused unless the user says --unsafe-no-sandbox."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.tasks.sandbox import Checked, SandboxUnavailable, run_programs

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def _show(expr: str) -> str:
    """A program that fails on purpose and reports `expr` as its outcome's detail."""
    return f"import os, sys, socket\nraise SystemExit(repr({expr}))"


@needs_bwrap
def test_a_pass_is_the_harness_token_not_an_exit_status():
    programs = {
        "returns": "x = 1",
        "raises": "assert False, 'no'",
        "sys_exit_0": "import sys\nsys.exit(0)",
        "os_exit_0": "import os\nos._exit(0)",
        "exec_true": "import os\nos.execv('/bin/true', ['true'])",
        # junk on every descriptor it has, then returns: the result pipe no longer holds exactly the token
        "junk_on_fds": "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'passed')\n"
                       "    except OSError:\n        pass",
        "later_part_fails": ["def f():\n    return 1\n", "assert f() == 2\n"],
        "swallows_next_part": ["x = '''\n", "assert False\n'''\n"],
    }
    outcome = dict(zip(programs, run_programs(list(programs.values()), timeout=10)))
    assert outcome["returns"].passed
    assert not any(o.passed for name, o in outcome.items() if name != "returns"), outcome
    assert outcome["os_exit_0"].detail == "ended (exit status 0) before the checks returned"
    assert outcome["sys_exit_0"].detail == "SystemExit: 0"
    assert "SyntaxError" in outcome["swallows_next_part"].detail  # each part compiles on its own


@needs_bwrap
def test_the_program_sees_almost_nothing_of_the_host():
    probes = {
        "uid": "os.getuid()",
        "parent": "os.getppid()",
        "root": "sorted(os.listdir('/'))",
        "processes": "sorted(int(p) for p in os.listdir('/proc') if p.isdigit())",
        "network": "[name for _, name in socket.if_nameindex()]",
        "cwd": "(os.getcwd(), os.listdir('.'))",
        "writable_usr": "os.access('/usr', os.W_OK)",
        "nproc": "__import__('resource').getrlimit(__import__('resource').RLIMIT_NPROC)",
        "site_packages": "[p for p in sys.path if 'site-packages' in p]",
        "environ": "sorted(os.environ)",
    }
    outcomes = run_programs([_show(e) for e in probes.values()], timeout=10)
    seen = {name: eval(o.detail.removeprefix("SystemExit: ")) for name, o in zip(probes, outcomes)}  # noqa: S307
    assert seen["uid"] != 0
    assert seen["parent"] == 1  # the sandbox's init; killing it from inside does nothing
    assert not {"etc", "home", "work", "var", "mnt", "opt", "srv"} & set(seen["root"])
    assert max(seen["processes"]) < 10  # its own PID namespace: bwrap's init, itself
    assert seen["network"] == ["lo"]
    assert seen["cwd"] == ("/tmp", [])
    assert seen["writable_usr"] is False
    assert seen["nproc"][0] <= 64
    assert seen["site_packages"] == []
    assert set(seen["environ"]) <= {"HOME", "LANG", "PATH", "PWD", "TMPDIR"}  # no tokens, proxies or PYTHON*


def _samples(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps({"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"task_id": "T/0", "completion": c}) + "\n"
                               for c in ("    return 1\n", "    import sys\n    sys.exit(0)\n")))
    return data, samples


def _fake_bwrap(folder: Path) -> None:
    """A bwrap that behaves like one on a kernel without unprivileged user namespaces."""
    folder.mkdir()
    exe = folder / "bwrap"
    exe.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("bwrap", ["missing", "broken"])
def test_without_a_working_sandbox_model_code_is_refused(tmp_path, monkeypatch, capsys, bwrap):
    if bwrap == "broken":
        _fake_bwrap(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(SandboxUnavailable, match="--unsafe-no-sandbox"):
        run_programs(["x = 1"])
    data, samples = _samples(tmp_path)
    assert main(["bench", "humaneval", "--samples", str(samples), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "refusing to run model-written code without isolation" in err
    assert ("not installed" if bwrap == "missing" else "No permissions") in err
    assert "Traceback" not in err


def test_unsafe_no_sandbox_runs_with_the_same_proof_of_a_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    ours = tmp_path / "tmp"
    ours.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(ours))
    data, samples = _samples(tmp_path)
    out = tmp_path / "r.json"
    assert main(["bench", "humaneval", "--samples", str(samples), "--data", str(data), "--unsafe-no-sandbox",
                 "--json", str(out)]) == 0
    assert "WITHOUT a sandbox" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["pass@1"] == 0.5  # the right answer passes, sys.exit(0) does not
    [outcome] = run_programs([_show("os.getuid()")], unsafe_no_sandbox=True)
    assert outcome.detail == f"SystemExit: {os.getuid()}"
    assert list(ours.iterdir()) == []  # its working folder is gone


def _checked(function: str, check: str, name: str = "f") -> Checked:
    return Checked(function=(function,), name=name, setup=(), check=check)


# What a process can see of the other side: descriptors, PID namespace, uid, processes.
SEEN = ("(sorted(os.listdir('/proc/self/fd')), os.readlink('/proc/self/ns/pid'), os.getuid(), "
        "sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")


@needs_bwrap
def test_a_checked_function_holds_nothing_of_its_checker():
    function = f"import os\ndef f():\n    return {SEEN}\n"
    check = f"import os\nraise SystemExit(repr((f(), {SEEN})))"
    [outcome] = run_programs([_checked(function, check)], timeout=10)
    (fds, pid_ns, uid, pids), (checker_fds, checker_pid_ns, checker_uid, _) = eval(  # noqa: S307
        outcome.detail.removeprefix("SystemExit: "))
    assert len(fds) == 6  # stdin, stdout, stderr, its calls and replies pipes, and the one listdir opened
    assert len(checker_fds) == 8  # and the token and result pipes: those only the checker has
    assert pid_ns != checker_pid_ns and uid != checker_uid and uid != 0
    assert max(pids) < 10  # its own PID namespace: bwrap's init and itself


@needs_bwrap
def test_a_checked_function_answers_with_values_and_exceptions():
    function = ("def f(x, scale=1):\n"
                "    if x == 'value':\n        raise ValueError('no ' + x)\n"
                "    if x == 'stop':\n        raise StopIteration\n"
                "    if x == 'own':\n        raise type('Oops', (Exception,), {})('mine')\n"
                "    if x == 'exit':\n        raise SystemExit(0)\n"
                "    return [x * scale, (x,), {x: None}, {x}, 1e999, -0.0, True]\n")
    checks = {
        "values": "assert f(2, scale=3) == [6, (2,), {2: None}, {2}, float('inf'), 0.0, True]\n"
                  "assert type(f(2)[-1]) is bool and str(f(2)[-2]) == '-0.0'",
        "expected_exception": "try:\n    f('value')\nexcept ValueError as e:\n    assert str(e) == 'no value'\n"
                              "else:\n    raise AssertionError('no exception')",
        # a StopIteration from the function would end map() early and make all() hold
        "stop_iteration": "assert all(map(f, ['stop', 'stop']))",
        "own_exception": "f('own')",
        "system_exit": "f('exit')",
    }
    outcome = dict(zip(checks, run_programs([_checked(function, c) for c in checks.values()], timeout=10)))
    assert outcome["values"].passed and outcome["expected_exception"].passed, outcome
    assert outcome["stop_iteration"].detail == "FunctionError: StopIteration:"
    assert outcome["own_exception"].detail == "FunctionError: Oops: mine"
    assert outcome["system_exit"].detail == "FunctionError: SystemExit: 0"


@needs_bwrap
def test_a_function_that_does_not_load_fails_with_its_error():
    programs = [_checked("def f(:\n", "f()"), _checked("g = 1\n", "f()"), _checked("import os\nos._exit(0)\n", "pass")]
    details = [o.detail for o in run_programs(programs, timeout=10)]
    assert details[0].startswith("SyntaxError: invalid syntax (<program part 0>")
    assert details[1] == "NameError: name 'f' is not defined"
    assert details[2] == "FunctionError: the function's process ended before it replied"  # even if never called
