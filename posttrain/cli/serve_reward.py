"""``posttrain serve-reward``: serve one reward over HTTP, for the ``remote`` reward (or any client).

    posttrain serve-reward --reward math_verify --reward-arg boxed_only=true --port 8000
    posttrain serve-reward --reward ./my_rewards.py:judge --host 0.0.0.0 --port 0   # 0: any free port

Endpoints (docs/rewards.md, "Rewards over HTTP"):
  POST /score   {"rows": [{"prompt": ..., "completion": ..., <columns>...}, ...]}, rows as posttrain score
                reads them; the reply is {"rows": [{"reward": float|null, "reward_info": {...}}, ...]} in the
                same order, with "error" on the rows the reward could not score.
  GET /health   {"reward": NAME, "ready": true, "columns": [...], "stats": {...}}

A malformed request gets a 4xx with {"error": "one-line message"}; the server keeps serving. Once the
reward is loaded, the address is printed on one line (``serving reward 'NAME' on http://HOST:PORT ...``).
SIGINT or SIGTERM stops it cleanly: requests in flight finish (for up to 30 s), the reward is closed, and
the command exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading

from posttrain.cli.score import RewardAction, batch_columns, check_row
from posttrain.errors import UserError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30
_LOGGED_FAILURES = 10


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, " ".join(message.split())


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve-reward", help="serve a reward over HTTP (for the 'remote' reward)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", action=RewardAction, metavar="NAME", required=True,
                        help="the reward to serve: a built-in name, an entry point, 'pkg.module:function' or "
                             "'./file.py:function'")
    parser.add_argument("--reward-arg", action=RewardAction, metavar="KEY=VALUE",
                        help="an argument of the reward (VALUE is JSON if it parses, else a string)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                        "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per reward call on a request's rows "
                        "(default 600); rows past it are answered with an error")
    parser.add_argument("--workers", type=int, default=2, help="parallel workers for rewards that use them "
                        "(sandbox, math_verify); default 2")
    parser.add_argument("--concurrency", type=int, default=4, help="requests scored at once; others wait "
                        "(default 4)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default "
                        "64); larger ones get 413")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                        default="warning", help="server log level (info and debug log every request)")
    parser.set_defaults(func=run_serve, rewards=None)
    return parser


def _served_reward_set(entry: dict, *, timeout: float, workers: int):
    """A one-reward ``RewardSet`` that reports failed rows instead of applying a policy: the client does."""
    from reward_models import RewardSet, RewardSpec

    class Served(RewardSet):
        def _log(self, issues) -> None:  # failures go back to the client as row errors, not "scored 0"
            for issue in issues:
                n = self._logged.get(issue.reward, 0)
                if n < _LOGGED_FAILURES:
                    log.warning("%s (answered as the row's error)", issue)
                self._logged[issue.reward] = n + 1

    spec = RewardSpec.from_dict(entry, f"--reward {entry['name']}")
    return Served([spec], on_error="zero", timeout=timeout, workers=workers)


class ScoringService:
    """The HTTP side: reads and checks requests, scores them with the reward set, writes replies."""

    def __init__(self, rewards, *, max_body: int, concurrency: int) -> None:
        self.rewards = rewards
        self.label = rewards.labels[0]
        self.columns = rewards.columns()
        self.max_body = max_body
        self.gate = asyncio.Semaphore(concurrency)
        self.in_flight = 0

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[Route("/score", self.score, methods=["POST"]),
                                 Route("/health", self.health, methods=["GET"])])

    @staticmethod
    def reply(body: object, status: int = 200):
        from starlette.responses import Response

        text = json.dumps(body, ensure_ascii=False, allow_nan=False, default=str)
        return Response(text, status_code=status, media_type="application/json")

    async def health(self, request):
        return self.reply({"reward": self.label, "ready": True,
                           "columns": [c.name for c in self.columns[self.label]],
                           "in_flight": self.in_flight, "stats": dict(self.rewards.stats[self.label])})

    async def read_rows(self, request) -> list[dict]:
        """The request's rows, checked as ``posttrain score`` checks a file's rows; ``BadRequest`` otherwise."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(400, f"Content-Length {declared!r} is not a number.")
            if int(declared) > self.max_body:
                raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of "
                                      f"{self.max_body} bytes (--max-body-mb); send fewer rows per request.")
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise BadRequest(413, f"request body is over the limit of {self.max_body} bytes "
                                          "(--max-body-mb); send fewer rows per request.")
                chunks.append(chunk)
        except ClientDisconnect:
            raise BadRequest(400, "the client disconnected before sending the whole body.") from None
        data = b"".join(chunks)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRequest(400, f"request body is not UTF-8 text (byte {data[err.start:err.start + 1].hex()!r} "
                                  f"at byte {err.start + 1}: {err.reason}).") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadRequest(400, f"request body is not valid JSON ({err.msg} at line {err.lineno} column "
                                  f"{err.colno}).") from None
        if not isinstance(body, dict) or not isinstance(body.get("rows"), list) or set(body) != {"rows"}:
            got = f"keys {sorted(body)}" if isinstance(body, dict) else f"a JSON {type(body).__name__}"
            raise BadRequest(400, f'expected a JSON object {{"rows": [row, ...]}}, got {got}.')
        rows = body["rows"]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise BadRequest(400, f"request, row {i}: expected a JSON object, got {type(row).__name__}.")
            try:
                check_row("request", i, row, {})  # completion, prompt, reserved names
            except UserError as err:
                raise BadRequest(400, err.message) from None
            # A column the reward reads must be there; its value (null, another type) goes to the reward as it
            # is, as in process, where the reward decides (e.g. abstains on a null answer).
            for label, declared in self.columns.items():
                for column in declared:
                    if column.required and column.name not in row:
                        raise BadRequest(400, f"request, row {i}: missing field {column.name!r}, which reward "
                                              f"{label!r} reads ({column.description}).")
        return rows

    async def score(self, request):
        from reward_models.calling import describe_exception

        try:
            rows = await self.read_rows(request)
        except BadRequest as err:
            return self.reply({"error": err.message}, err.status)
        if not rows:
            return self.reply({"rows": []})
        async with self.gate:
            self.in_flight += 1
            try:
                result = await self.rewards.ascore([r.get("prompt", "") for r in rows], [r["completion"] for r in rows],
                                                   row_ids=list(range(len(rows))), **batch_columns(rows))
            except UserError as err:  # e.g. a row without a column the reward's signature requires
                return self.reply({"error": " ".join(str(err).split())}, 400)
            except Exception as err:  # noqa: BLE001 - a bug outside the reward's own call: 500, keep serving
                log.exception("scoring a request failed")
                return self.reply({"error": f"the server failed to score the request: {describe_exception(err)}"},
                                  500)
            finally:
                self.in_flight -= 1
        errors: dict[int, list[str]] = {}
        for issue in result.issues:
            errors.setdefault(issue.row, []).append(f"{issue.kind}: {issue.message}")
        column = result.scores[self.label]
        out = []
        for i in range(len(rows)):
            row = {"reward": None if i in errors else column[i], "reward_info": result.info[i].get(self.label) or {}}
            if i in errors:
                row["error"] = "; ".join(errors[i])
            out.append(row)
        return self.reply({"rows": out})


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"cannot listen on {host!r}: {err.strerror}.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(256)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}.",
                        hint="Pick another --port (0 picks a free one).") from None
    sock.setblocking(False)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose signal handling ends ``serve`` without re-raising the signal afterwards
        (so SIGTERM and SIGINT end the command with status 0, after the reward is closed)."""

        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = self.stopped_by or sig
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if len(args.rewards) != 1:
        raise UserError(f"serve-reward serves one reward; got {len(args.rewards)} --reward options.",
                        hint="Start one server per reward (each on its own --port).")
    if args.workers < 1 or args.concurrency < 1:
        raise UserError("--workers and --concurrency must be at least 1.")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}.")
    if args.timeout <= 0 or args.max_body_mb <= 0:
        raise UserError("--timeout and --max-body-mb must be positive.")
    with _served_reward_set(args.rewards[0], timeout=args.timeout, workers=args.workers) as rewards:
        service = ScoringService(rewards, max_body=int(args.max_body_mb * 2**20), concurrency=args.concurrency)
        sock = _listen(args.host, args.port)
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        config = uvicorn.Config(service.app(), log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                                lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        server = _server_class()(config)
        print(f"serving reward {service.label!r} on http://{shown}:{port} (POST /score, GET /health); "
              "stop with Ctrl-C or SIGTERM", flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
        how = signal.Signals(server.stopped_by).name if server.stopped_by else "shutdown"
        print(f"stopped ({how}): {rewards.stats[service.label]}", file=sys.stderr, flush=True)
    return 0
