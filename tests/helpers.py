"""Helpers that several test modules share: a small training set and config (test_train, test_checkpoint,
test_distributed, test_guard, test_precision, test_integrations_hf) and a real `imtune serve` process with a GET
client (test_serve, test_judge, test_tasks_alpacaeval, test_tasks_mtbench, conftest). Not a test module: pytest
collects nothing here, and importing it runs no test module's top level."""
from __future__ import annotations

import json
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

from hypothesis import strategies as st

from imtune.config import TrainConfig
from imtune.types import Conversation, Message, Where

# torch 2.13 with gloo: a rank of a multi-process launch has died at start-up, once, with glibc's "free(): invalid
# pointer" (SIGABRT, before the first step; the 2026-12-07 clean-clone suite: test_distributed's FSDP launch, which
# then passed 6 times of 6 alone). torch 2.13's own distributed FSDP tests show the same abort
# (intel/torch-xpu-ops#4003). A launch that dies of exactly that is run once more; any other failure fails the test.
NATIVE_ABORT = "free(): invalid pointer"


def launched(cmd: list[str], env: dict, timeout: int = 600, fresh=None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) of a torchrun / accelerate launch, captured; run once more only when a rank died of
    NATIVE_ABORT (`fresh`: a directory the launch creates, removed first so the second try starts as the first did)."""
    import shutil

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode and NATIVE_ABORT in res.stderr:
        print(f"launch died of torch's native abort ({NATIVE_ABORT!r}); once more: {' '.join(cmd[:6])} ...")
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return res


WORDS = "alpha beta gamma delta river stone light cloud seven green quick table music paper north".split()


def write_conversations(path, n: int, seed: int = 0):
    """n short conversations (some with a system prompt, some two-turn) as messages JSONL."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "You are terse."}] if i % 3 == 0 else []
            for _ in range(1 + (i % 4 == 0)):
                msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 20)))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def tiny(data, out, **kw) -> TrainConfig:
    base = dict(model="random:tiny", data=str(data), output_dir=str(out), loss="im", max_length=128, lr=1e-3,
                warmup_ratio=0.0, progress=False, threads=1)
    return TrainConfig(**{**base, **kw})


def metrics(run, kind="train"):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == kind]


@contextmanager
def serving(model: str = "random:tiny", *extra: str, timeout: float = 180.0, program: list[str] | None = None):
    """Start `imtune serve MODEL --port 0` as a subprocess (`program` instead of `python -m imtune.cli`, e.g.
    `python -c CODE` that patches the server first); yield (process, base URL ending in /v1, stderr file).
    The process is always stopped (SIGTERM, then SIGKILL) on exit."""
    err = tempfile.TemporaryFile(mode="w+")
    program = program or [sys.executable, "-m", "imtune.cli"]
    proc = subprocess.Popen([*program, "serve", model, "--port", "0", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        url, deadline = None, time.time() + timeout
        while url is None:
            if proc.poll() is not None or time.time() > deadline:
                err.seek(0)
                raise RuntimeError(f"imtune serve did not start (rc {proc.poll()}): {err.read()[-2000:]}")
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if "listening on " in line:
                    url = line.split("listening on ", 1)[1].strip()
        yield proc, url, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        err.close()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def conv(*pairs, path="t.jsonl") -> Conversation:
    """A Conversation from (role, content) pairs (test_weights, test_templates)."""
    return Conversation(tuple(Message(r, c) for r, c in pairs), Where(path, 1, 0))


SIMPLE = conv(("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"),
              ("user", "And 3+3?"), ("assistant", "6, obviously."))

text_strategy = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co")), min_size=1,
                        max_size=40).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    """Random conversations (optional system message, 1-3 user/assistant turns) for property tests."""
    msgs = []
    if draw(st.booleans()):
        msgs.append(Message("system", draw(text_strategy)))
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(Message("user", draw(text_strategy)))
        msgs.append(Message("assistant", draw(text_strategy)))
    return Conversation(tuple(msgs), Where("h.jsonl", 1, 0))


def word_data(path, n: int = 10) -> str:
    """n short two-turn conversations over ten words, in the `messages` format (schedule and Ray tests)."""
    words = "alpha beta gamma delta river stone light cloud seven green".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": " ".join(words[(i + k) % 10] for k in range(6))},
                    {"role": "assistant", "content": " ".join(words[(i * 3 + k) % 10] for k in range(3))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def patch_everywhere(monkeypatch, module, name: str, value) -> None:
    """Replace `module.name` and every imtune module's own reference to the same object (imtune imports at module
    top: a consumer holds the function it imported, so patching only its home would not reach it)."""
    import importlib
    import pkgutil

    import imtune

    for info in pkgutil.walk_packages(imtune.__path__, "imtune."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    original = getattr(module, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.split(".")[0] == "imtune" and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, value)
