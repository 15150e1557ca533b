"""The judge's API key is hostile-server-proof: it goes only to https URLs or this machine unless the user opts in,
and a redirect is never followed (urllib would resend the Authorization header to wherever Location points).

The servers here are real ones (http.server on 127.0.0.1 in a thread): one answers every request with a redirect to
the other, which records whether an Authorization header reached it."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imtune.cli import main
from imtune.evaluate.judge import JudgeClient, JudgeError, judge_messages, key_is_private, open_judge
from imtune.types import UsageError

SECRET = "sk-do-not-leak"
CHAT = {"choices": [{"message": {"content": "[{'model': 'model_1', 'rank': 1}]"}}]}


@contextmanager
def server(answer):
    """A local HTTP server whose every request (any method) is answered by answer(handler); yields (base URL, the
    headers of each request it got, as dicts)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            seen.append(dict(self.headers))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer(self)

        do_GET = do_POST = do_HEAD = _any

        def log_message(self, *args):  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def chat_reply(h):
    body = json.dumps(CHAT).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def redirect_to(target: str, code: int):
    def answer(h):
        h.send_response(code)
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


def auth(headers: dict) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_never_reaches_the_other_host(code):
    with server(chat_reply) as (other, other_seen):
        with server(redirect_to(other + "/v1/chat/completions", code)) as (judge, judge_seen):
            client = JudgeClient(judge + "/v1/chat/completions", "m", api_key=SECRET, retries=0, timeout=10)
            with pytest.raises(JudgeError, match=rf"redirects \(HTTP {code}\) to '{other}.*not followed"):
                client.ask(judge_messages("q", "a", "b"))
    assert [auth(h) for h in judge_seen] == [f"Bearer {SECRET}"]  # plain http to this machine: the key goes
    assert other_seen == []  # the redirect's target was never asked, with or without the key


def test_the_key_is_sent_to_a_loopback_judge():
    with server(chat_reply) as (judge, seen):
        reply = JudgeClient(judge + "/v1/chat/completions", "m", api_key=SECRET, retries=0).ask([])
    assert reply == CHAT["choices"][0]["message"]["content"] and auth(seen[0]) == f"Bearer {SECRET}"


@pytest.mark.parametrize("url, private", [
    ("https://api.openai.com/v1/chat/completions", True), ("https://10.1.2.3/v1", True),
    ("http://127.0.0.1:8000/v1", True), ("http://127.8.9.10/v1", True), ("http://localhost:8000/v1", True),
    ("http://LOCALHOST./v1", True), ("http://[::1]:8000/v1", True),
    ("http://10.1.2.3:8000/v1", False), ("http://judge.example.com/v1", False), ("http://[::2]/v1", False),
    ("http://127.0.0.1.evil.example/v1", False), ("http://localhost.evil.example/v1", False),
    ("http://0.0.0.0:8000/v1", False), ("http://user@evil.example/v1", False),
])
def test_which_urls_may_carry_the_key(url, private):
    assert key_is_private(url) is private


def test_plain_http_to_another_machine_is_refused_before_connecting(monkeypatch):
    url = "http://judge.invalid:8000/v1/chat/completions"  # .invalid never resolves: nothing to connect to anyway
    with pytest.raises(UsageError, match="plain http to another machine.*--judge-key-anywhere"):
        JudgeClient(url, "m", api_key=SECRET)
    JudgeClient(url, "m")  # without a key there is nothing to leak
    JudgeClient(url, "m", api_key=SECRET, key_anywhere=True)  # the user opted in
    monkeypatch.setenv("IMTUNE_TEST_KEY", SECRET)
    with pytest.raises(UsageError, match="plain http"):
        open_judge("http://judge.invalid:8000/v1", "m", api_key_env="IMTUNE_TEST_KEY", cache="none")


def test_imtune_judge_refuses_and_names_the_opt_in(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows = json.dumps([{"instruction": "q", "output": "a"}])
    (tmp_path / "o.json").write_text(rows)
    (tmp_path / "r.json").write_text(rows)
    argv = ["judge", "--outputs", str(tmp_path / "o.json"), "--references", str(tmp_path / "r.json"),
            "--judge-url", "http://judge.invalid:8000", "--judge-model", "m", "--cache", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "plain http to another machine" in err and SECRET not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("task", ["alpacaeval", "mtbench"])
def test_judged_benchmarks_pass_the_opt_in_to_the_judge(task, monkeypatch):
    import importlib


    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    mod = importlib.import_module(f"imtune.tasks.{task}")
    monkeypatch.setattr(mod, "load", lambda *a: [])  # mtbench reads its data before opening the judge
    if task == "mtbench":
        monkeypatch.setattr(mod, "judge_prompts", lambda data: {})
    opts = dict(judge_url="http://judge.invalid:8000/v1", judge_model="m", judge_cache="none")
    with pytest.raises(UsageError, match="plain http"):
        mod.run(None, None, None, "data", **opts)

    class Reached(Exception):
        pass

    def fake_open_judge(*args, **kw):
        raise Reached(args[6] if len(args) > 6 else kw.get("key_anywhere", False))

    monkeypatch.setattr(mod, "open_judge", fake_open_judge)  # where the task looks it up
    with pytest.raises(Reached) as e:
        mod.run(None, None, None, "data", judge_key_anywhere=True, **opts)
    assert e.value.args == (True,)


def test_imtune_bench_passes_the_opt_in(monkeypatch, tmp_path):
    from imtune import tasks

    class Reached(Exception):
        pass

    def fake_run_benchmark(name, *args, **options):
        raise Reached(options.get("judge_key_anywhere"))

    monkeypatch.setattr(tasks, "run_benchmark", fake_run_benchmark)
    argv = ["bench", "alpacaeval", "--model", "random:tiny", "--data", str(tmp_path / "x.json"),
            "--judge-url", "http://judge.invalid:8000/v1", "--judge-model", "m", "--out", str(tmp_path)]
    with pytest.raises(Reached) as e:
        main([*argv, "--judge-key-anywhere"])
    assert e.value.args == (True,)
    with pytest.raises(Reached) as e:
        main(argv)
    assert e.value.args == (None,)
