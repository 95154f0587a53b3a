"""Rewards over HTTP: the ``remote`` reward against ``posttrain serve-reward`` (a real server process on
127.0.0.1) and against small misbehaving servers written here (failures, time-outs, 4xx, concurrency)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from posttrain.errors import UserError
from reward_models import RewardFailure, RewardSet, RewardSpec, load_reward
from reward_models.remote import RemoteRewardError
from tests.rewards.conftest import REPO, read_jsonl, run_score, write_jsonl

ROWS = [
    {"prompt": "What is 1 + 2?", "completion": "The answer is \\boxed{3}.", "answer": "3",
     "references": ["The answer is 3."]},
    {"prompt": "What is 3/4 as a decimal?", "completion": "It is 0.75", "answer": "\\frac{3}{4}",
     "references": ["It is 0.75.", "0.75"]},
    {"prompt": "What is 2 + 2?", "completion": "\\boxed{5}", "answer": "4", "references": "The answer is 4."},
    {"prompt": "Name a set.", "completion": "<answer>{1, 2}</answer>", "answer": "\\{1,2\\}",
     "references": []},
    {"prompt": "No reference.", "completion": "whatever", "answer": None, "references": ["whatever it is"]},
    {"prompt": [{"role": "user", "content": "chat?"}],
     "completion": [{"role": "assistant", "content": "the cat sat on the mat, 7"}], "answer": 7,
     "references": ["the cat sat on the mat"]},
    {"prompt": "Unicode", "completion": "résumé naïve 42 ✓", "answer": "42", "references": ["résumé naïve ✓"]},
]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {"answer": [r["answer"] for r in rows], "references": [r["references"] for r in rows],
            "completion_ids": [None] * len(rows)}


# -- a real `posttrain serve-reward` process ----------------------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        return code, self.log.read_text()


@contextlib.contextmanager
def serving(*args: str, log_dir, cwd=None):
    """``posttrain serve-reward ARGS --port 0`` in a fresh interpreter; yields once it printed its address."""
    log = log_dir / f"serve-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli.main", "serve-reward", *args, "--port", "0"],
                                cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    guard = threading.Timer(60, proc.kill)  # a server that never prints its address fails the test, not hangs it
    guard.start()
    try:
        line = proc.stdout.readline()
        guard.cancel()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
        assert match, f"no address printed: {line!r}; stderr: {log.read_text()[-2000:]}"
        served = Served(proc, match.group(1), log)
        yield served
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def math_server(tmp_path_factory):
    with serving("--reward", "math_verify", "--reward-arg", "workers=1", log_dir=tmp_path_factory.mktemp("m")) as s:
        yield s
        code, log = s.stop()
        assert code == 0, log


@pytest.fixture(scope="module")
def bleu_server(tmp_path_factory):
    with serving("--reward", "bleu", "--max-body-mb", "0.05", log_dir=tmp_path_factory.mktemp("b")) as s:
        yield s
        code, log = s.stop()
        assert code == 0, log


def test_remote_scores_exactly_as_in_process(math_server, bleu_server):
    prompts, completions = [r["prompt"] for r in ROWS], [r["completion"] for r in ROWS]
    local = [RewardSpec("math_verify", weight=1.0, args={"workers": 1}), RewardSpec("bleu", weight=0.5)]
    remote = [RewardSpec("remote", weight=1.0, label="math_verify", args={"url": math_server.url, "batch_size": 2}),
              RewardSpec("remote", weight=0.5, label="bleu", args={"url": bleu_server.url, "batch_size": 3,
                                                                   "concurrency": 2})]
    with RewardSet(local) as here, RewardSet(remote) as there:
        expected = here.score(prompts, completions, **_columns(ROWS))
        got = there.score(prompts, completions, **_columns(ROWS))
    assert got.scores == expected.scores
    assert got.totals == expected.totals
    assert [got.reward_info(i) for i in range(len(ROWS))] == [expected.reward_info(i) for i in range(len(ROWS))]
    assert got.issues == expected.issues == []
    # the data really exercises both rewards: correct and wrong answers, and abstentions
    assert expected.scores["math_verify"][:3] == [1.0, 1.0, 0.0] and expected.scores["math_verify"][4] is None
    assert expected.scores["bleu"][3] is None and 0 < expected.scores["bleu"][1] <= 1


def test_score_cli_through_remote_matches_in_process(bleu_server, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": i, **r} for i, r in enumerate(ROWS)])
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    local = run_score("--reward", "bleu", str(data), "-o", str(here))
    assert local.returncode == 0, local.stderr
    remote = run_score("--reward", "remote", "--reward-arg", f"url={bleu_server.url}", "--reward-arg", "batch_size=2",
                       str(data), "-o", str(there), "--batch-size", "5")
    assert remote.returncode == 0, remote.stderr
    expected, got = read_jsonl(here), read_jsonl(there)
    assert [r["id"] for r in got] == list(range(len(ROWS)))
    assert [r["reward"] for r in got] == [r["reward"] for r in expected]
    assert [r["reward_info"]["scores"]["remote"] for r in got] == [r["reward_info"]["scores"]["bleu"] for r in expected]
    assert [r["reward_info"].get("details", {}).get("remote") for r in got] == \
        [r["reward_info"].get("details", {}).get("bleu") for r in expected]
    assert "remote: 6 scored, 1 skipped, 0 failed" in remote.stderr


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(bleu_server):
    url = bleu_server.url
    good = {"rows": [{"completion": "the cat", "references": ["the cat sat"]}]}
    cases = [
        (b"not json", 400, "not valid JSON"),
        (b'{"rows": [{"completion": "caf\xe9", "references": "x"}]}', 400, "not UTF-8"),
        (b"[]", 400, 'expected a JSON object {"rows"'),
        (b'{"rows": 3}', 400, 'expected a JSON object {"rows"'),
        (b'{"rows": [], "extra": 1}', 400, "keys ['extra', 'rows']"),
        (b'{"rows": ["text"]}', 400, "row 0: expected a JSON object, got str"),
        (b'{"rows": [{"references": "x"}]}', 400, "row 0: missing field 'completion'"),
        (json.dumps({"rows": [good["rows"][0], {"completion": "a"}]}).encode(), 400,
         "row 1: missing field 'references', which reward 'bleu' reads"),
        (b'{"rows": [{"completion": 5, "references": "x"}]}', 400, "field 'completion' must be a string"),
        (json.dumps({"rows": [{"completion": "x" * 60_000, "references": "x"}]}).encode(), 413, "over the limit"),
    ]
    with httpx.Client(timeout=30) as client:
        for body, status, text in cases:
            response = client.post(f"{url}/score", content=body)
            assert response.status_code == status, (body[:80], response.text)
            message = response.json()["error"]
            assert text in message and "\n" not in message, message
        # a body without Content-Length (chunked) is cut off as it streams in
        chunked = client.post(f"{url}/score", content=iter([b'{"rows": [{"completion": "', b"y" * 60_000, b'"}]}']))
        assert chunked.status_code == 413 and "over the limit" in chunked.json()["error"]
        assert client.get(f"{url}/score").status_code == 405
        health = client.get(f"{url}/health").json()
        assert health["reward"] == "bleu" and health["ready"] is True and health["columns"] == ["references"]
        reply = client.post(f"{url}/score", json=good).json()
        assert reply["rows"][0]["reward"] == pytest.approx(load_reward("bleu")(["q"], ["the cat"],
                                                                              references=[["the cat sat"]])[0])
        assert client.post(f"{url}/score", json={"rows": []}).json() == {"rows": []}
    assert bleu_server.proc.poll() is None


PICKY = textwrap.dedent('''
    def picky(prompts, completions, **columns):
        if any(c == "crash" for c in completions):
            raise RuntimeError("picky cannot read 'crash'")
        return [float(len(c)) for c in completions]
''')


def test_a_reward_that_raises_answers_row_errors_and_sigint_stops_cleanly(tmp_path):
    (tmp_path / "rewards.py").write_text(PICKY)
    with serving("--reward", "./rewards.py:picky", log_dir=tmp_path, cwd=tmp_path) as server:
        reply = httpx.post(f"{server.url}/score", json={"rows": [{"completion": c} for c in ("ab", "crash", "c")]})
        assert reply.status_code == 200
        rows = reply.json()["rows"]
        assert [r["reward"] for r in rows] == [2.0, None, 1.0]
        assert "error" not in rows[0] and "RuntimeError: picky cannot read 'crash'" in rows[1]["error"]
        spec = {"name": "remote", "args": {"url": server.url}}
        with RewardSet([spec], on_error="zero") as rewards:
            result = rewards.score(["", "", ""], ["ab", "crash", "c"], row_ids=[10, 11, 12])
            assert result.scores["remote"] == [2.0, 0.0, 1.0]
            assert [(i.row, i.kind) for i in result.issues] == [(11, "error")]
            assert server.url in result.issues[0].message and "picky cannot read" in result.issues[0].message
            assert rewards.stats["remote"] == {"scored": 2, "skipped": 0, "failed": 1}
        with RewardSet([spec]) as rewards, pytest.raises(RewardFailure, match="picky cannot read 'crash'"):
            rewards.score(["", ""], ["ok", "crash"])
        code, log = server.stop(signal.SIGINT)
    assert code == 0, log
    assert "stopped (SIGINT)" in log and "Traceback" not in log


def test_serve_reward_refuses_bad_commands(tmp_path):
    base = [sys.executable, "-m", "posttrain.cli.main", "serve-reward", "--port", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    unknown = subprocess.run([*base, "--reward", "blue"], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown reward 'blue'" in unknown.stderr and "'bleu'" in unknown.stderr
    two = subprocess.run([*base, "--reward", "bleu", "--reward", "format"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert two.returncode == 2 and "serves one reward" in two.stderr


# -- small servers that misbehave on purpose ----------------------------------------------------------------


class FakeServer:
    """A threaded HTTP server on 127.0.0.1. ``respond(attempt, rows)`` -> (status, JSON body[, headers]); the
    default answers len(completion) per row. Counts attempts and requests in flight."""

    def __init__(self, respond=None) -> None:
        self.respond = respond or (lambda attempt, rows: (200, echo(rows)))
        self.attempts, self.in_flight, self.max_in_flight = 0, 0, 0
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.attempts += 1
                    attempt = fake.attempts
                    fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, payload, *headers = fake.respond(attempt, body["rows"])
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers[0] if headers else {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def echo(rows: list[dict]) -> dict:
    return {"rows": [{"reward": float(len(r["completion"])), "reward_info": {"n": len(r["completion"])}}
                     for r in rows]}


@pytest.fixture
def fake():
    servers = []

    def make(respond=None) -> FakeServer:
        servers.append(FakeServer(respond))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _score(reward, completions, **columns):
    return asyncio.run(reward([""] * len(completions), completions, **columns))


def test_posts_rows_as_posttrain_score_reads_them(fake):
    server = fake()
    reward = load_reward("remote", url=server.url + "/", headers={"Authorization": "Bearer t0ken"})
    out = _score(reward, ["ab", "cde"], answer=["1", 2], completion_ids=[[5, 6], None])
    assert list(out) == [2.0, 3.0] and out.info == [{"n": 2}, {"n": 3}] and out.errors == {}
    path, headers, body = server.requests[0]
    assert path == "/score"
    assert headers["authorization"] == "Bearer t0ken" and headers["content-type"] == "application/json"
    assert body == {"rows": [{"prompt": "", "completion": "ab", "answer": "1", "completion_ids": [5, 6]},
                             {"prompt": "", "completion": "cde", "answer": 2, "completion_ids": None}]}
    # a URL with a path is used as it is; rows without ids get completion_ids: null
    _score(load_reward("remote", url=server.url + "/v1/reward"), ["x"])
    assert server.requests[1][0] == "/v1/reward" and server.requests[1][2]["rows"][0]["completion_ids"] is None


def test_5xx_and_429_are_retried_then_scored(fake):
    server = fake(lambda attempt, rows: (500, {"error": "busy"}) if attempt <= 2 else (200, echo(rows)))
    reward = load_reward("remote", url=server.url, retries=2, backoff=0.01)
    assert list(_score(reward, ["abc", "d"])) == [3.0, 1.0]
    assert server.attempts == 3
    limited = fake(lambda attempt, rows: (429, {"error": "slow down"}, {"Retry-After": "0.2"}) if attempt == 1
                   else (200, echo(rows)))
    start = time.monotonic()
    assert list(_score(load_reward("remote", url=limited.url, retries=1, backoff=0.0), ["ab"])) == [2.0]
    assert limited.attempts == 2 and time.monotonic() - start >= 0.2  # Retry-After was honoured


def test_retries_spent_rows_fail_per_the_policy(fake):
    # requests holding a "down" row always fail; the others are answered
    server = fake(lambda attempt, rows: (503, {"error": "down for maintenance"})
                  if any(r["completion"] == "down" for r in rows) else (200, echo(rows)))
    spec = {"name": "remote", "args": {"url": server.url, "batch_size": 2, "retries": 2, "backoff": 0.01}}
    completions = ["aa", "down", "bbb", "c", "down"]
    with RewardSet([spec], on_error="zero") as rewards:
        result = rewards.score([""] * 5, completions, row_ids=[1, 2, 3, 4, 5])
        assert result.scores["remote"] == [0.0, 0.0, 3.0, 1.0, 0.0]
        assert [(i.row, i.kind) for i in result.issues] == [(1, "error"), (2, "error"), (5, "error")]
        message = result.issues[0].message
        assert server.url in message and "HTTP 503: down for maintenance" in message and "after 3 attempts" in message
        assert rewards.stats["remote"] == {"scored": 2, "skipped": 0, "failed": 3}
    assert server.attempts == 2 * 3 + 1  # two failing requests, three attempts each; no row-by-row retry storm
    with RewardSet([spec]) as rewards, pytest.raises(RewardFailure, match="HTTP 503"):
        rewards.score(["", ""], ["down", "x"])


def test_timeouts_and_refused_connections_are_retried(fake):
    def slow_first(attempt, rows):
        if attempt == 1:
            time.sleep(3.0)
        return 200, echo(rows)

    server = fake(slow_first)
    start = time.monotonic()
    assert list(_score(load_reward("remote", url=server.url, timeout=0.3, retries=1, backoff=0.0), ["abcd"])) == [4.0]
    assert server.attempts == 2 and time.monotonic() - start < 2.5  # did not wait for the slow reply

    hung = fake(lambda attempt, rows: (time.sleep(1.0), (200, echo(rows)))[1])
    out = _score(load_reward("remote", url=hung.url, timeout=0.2, retries=1, backoff=0.0), ["a", "b"])
    assert hung.attempts == 2 and list(out.errors) == [0, 1]
    assert "no reply within 0.2 s" in out.errors[0] and "after 2 attempts" in out.errors[0]

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = _score(load_reward("remote", url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01), ["a"])
    assert "ConnectError" in out.errors[0] and "after 3 attempts" in out.errors[0]


def test_4xx_is_not_retried_and_names_the_url_and_message(fake):
    server = fake(lambda attempt, rows: (400, {"error": "row 0: missing field 'tests'"}))
    reward = load_reward("remote", url=server.url, retries=5, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=re.escape(f"{server.url}/score refused the request (HTTP 400): "
                                                          "row 0: missing field 'tests'")):
        _score(reward, ["a", "b"])
    assert server.attempts == 1
    # in a reward set the batch's rows are then tried one by one: each is named, none is retried
    with RewardSet([{"name": "remote", "args": {"url": server.url, "retries": 5}}], on_error="zero") as rewards:
        result = rewards.score(["", ""], ["a", "b"])
    assert server.attempts == 1 + 1 + 2
    assert [(i.row, i.kind) for i in result.issues] == [(0, "error"), (1, "error")]
    assert "missing field 'tests'" in result.issues[0].message


def test_a_reply_in_another_format_fails_its_rows(fake):
    server = fake(lambda attempt, rows: (200, {"rows": [{"reward": 1.0}]}))
    out = _score(load_reward("remote", url=server.url, retries=3), ["a", "b"])
    assert list(out.errors) == [0, 1] and "with 2 rows, got 1 rows" in out.errors[0]
    assert server.attempts == 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit_is_respected(fake, concurrency):
    def slow(attempt, rows):
        time.sleep(0.25)
        return 200, echo(rows)

    server = fake(slow)
    reward = load_reward("remote", url=server.url, batch_size=1, concurrency=concurrency)
    completions = ["x" * k for k in range(1, 7)]
    assert list(_score(reward, completions)) == [float(k) for k in range(1, 7)]
    assert server.attempts == 6
    assert server.max_in_flight == concurrency


@pytest.mark.parametrize("args, text", [
    ({}, "needs the argument 'url'"),
    ({"url": "localhost:8000"}, "url must be an http:// or https:// address"),
    ({"url": "http://h:1", "batch_size": 0}, "batch_size must be an integer of at least 1"),
    ({"url": "http://h:1", "retries": -1}, "retries must be an integer of at least 0"),
    ({"url": "http://h:1", "concurrency": 1.5}, "concurrency must be an integer"),
    ({"url": "http://h:1", "timeout": 0}, "timeout must be a positive number"),
    ({"url": "http://h:1", "headers": {"X": 1}}, "headers must be a mapping"),
    ({"url": "http://h:1", "retry": 2}, "has no argument 'retry'"),
])
def test_bad_settings_are_user_errors(args, text):
    with pytest.raises(UserError, match=re.escape(text)):
        load_reward("remote", **args)


@pytest.mark.slow
def test_grpo_recipe_scores_through_serve_reward(tiny_model, arithmetic_data, tmp_path):
    """recipes/grpo_remote_reward.yaml, two tiny steps, with its reward served by a real server (about 25 s)."""
    from tests.conftest import read_metrics, run_cli

    with serving("--reward", "math_verify", "--reward-arg", "boxed_only=true", "--reward-arg", "workers=1",
                 log_dir=tmp_path) as server:
        out = tmp_path / "run"
        result = run_cli("run", str(REPO / "recipes" / "grpo_remote_reward.yaml"), f"model.path={tiny_model}",
                         f"data.path={arithmetic_data['train']}", f"data.eval_path={arithmetic_data['test']}",
                         f"output_dir={out}", "train.max_steps=2", "grpo.prompts_per_step=4", "rollout.n=4",
                         "rollout.max_tokens=12", "train.global_batch_size=8", "train.micro_batch_size=8",
                         "grpo.eval_prompts=8", "train.eval_every=0", "logging.progress=false",
                         "logging.tensorboard=false",
                         f"grpo.rewards=[{{name: remote, label: math_verify, args: {{url: '{server.url}'}}}}]")
        assert result.returncode == 0, result.stderr[-3000:]
        code, log = server.stop()
    assert code == 0, log
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("reward/math_verify" in r for r in steps)
    assert all(r["reward/issues"] == 0 for r in steps)
    # 2 steps x 16 samples, and 8 evaluation prompts before and after training, all scored by the server
    assert "stopped (SIGTERM): {'scored': 48, 'skipped': 0, 'failed': 0}" in log
