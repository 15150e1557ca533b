"""imtune serve: a real server process on 127.0.0.1 answers in the OpenAI chat-completions shape and stops cleanly."""
from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest


@contextmanager
def serving(model: str = "random:tiny", *extra: str, timeout: float = 180.0):
    """Start `imtune serve MODEL --port 0` as a subprocess; yield (process, base URL ending in /v1, stderr file).
    The process is always stopped (SIGTERM, then SIGKILL) on exit."""
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "imtune.cli", "serve", model, "--port", "0", "--quiet", *extra],
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
        for _ in range(50):
            try:
                if get(url.removesuffix("/v1") + "/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
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


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server():
    with serving("random:tiny", "--name", "tiny-test", "--max-tokens", "8") as s:
        yield s


def test_chat_completion_has_the_openai_shape(server):
    _, url, _ = server
    status, r = post(url + "/chat/completions", {"model": "whatever", "max_tokens": 6, "temperature": 0.8, "seed": 1,
                                                 "messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Say hello."}]})
    assert status == 200, r
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == "tiny-test"
    assert isinstance(r["created"], int)
    (choice,) = r["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = r["usage"]
    assert u["prompt_tokens"] > 5 and 0 <= u["completion_tokens"] <= 7
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # Same seed, same sampled answer; the /v1-less route answers too; greedy ignores the seed.
    assert post(url.removesuffix("/v1") + "/chat/completions",
                {"max_tokens": 6, "temperature": 0.8, "seed": 1,
                 "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Say hello."}]})[1]["choices"][0]["message"] == \
        choice["message"]


def test_models_health_and_counters(server):
    _, url, _ = server
    models = get(url + "/models")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-test"]
    before = get(url.removesuffix("/v1") + "/health")
    assert before["status"] == "ok" and before["model"] == "tiny-test"
    post(url + "/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                     "max_tokens": 2, "temperature": 0})
    after = get(url.removesuffix("/v1") + "/health")
    assert after["requests"]["chat_completions"] == before["requests"]["chat_completions"] + 1


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
])
def test_bad_requests_get_400_with_an_error_body(server, body, fragment):
    _, url, _ = server
    status, r = post(url + "/chat/completions", body)
    assert status == 400 and fragment in r["error"]["message"] and r["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_404(server):
    _, url, _ = server
    status, r = post(url + "/completions", {"prompt": "x"})
    assert status == 404 and "error" in r


def test_sigterm_stops_the_server_cleanly(server):  # last in the file: it ends the module's server
    proc, url, err = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    err.seek(0)
    assert "imtune serve: stopped" in err.read()
    with pytest.raises(OSError):
        get(url.removesuffix("/v1") + "/health")
