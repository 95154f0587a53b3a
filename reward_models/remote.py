"""``remote``: a reward computed by a server over HTTP (``posttrain serve-reward``, or any server that speaks
the same JSON).

The batch is posted as rows, exactly as ``posttrain score`` reads them::

    POST <url>    {"rows": [{"prompt": ..., "completion": ..., "completion_ids": ..., <columns>...}, ...]}
    200 OK        {"rows": [{"reward": 0.5, "reward_info": {...}}, {"reward": null, "error": "..."}, ...]}

one reply row per request row, in order. ``reward`` is a number or null (no opinion); ``reward_info``
(optional, an object) becomes the row's details; ``error`` (optional, a string) marks a row the server
could not score, handled by the failure policy like an error raised in process.

The batch is split into requests of ``batch_size`` rows, at most ``concurrency`` of them in flight.
A request that fails to connect, times out (``timeout`` seconds for the whole request), or gets a 5xx,
408 or 429 is retried ``retries`` times, after ``backoff * 2**k`` seconds (k = 0, 1, ...; a
``Retry-After`` header of a 429/503 is honoured, up to ``max_backoff``). When the retries are spent, the
rows of that request are reported as errors (``RewardOutput.errors``), so the failure policy counts them
one by one and the other requests keep their scores. Any other 4xx is not retried: it raises
``RemoteRewardError`` naming the URL and the server's message (the reward set then retries the rows one by
one, which names the rows the server refuses and scores the others). See docs/rewards.md, "Rewards over
HTTP".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.types import RewardOutput

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429})  # besides every 5xx
_MESSAGE_CHARS = 300


class RemoteRewardError(RuntimeError):
    """A reward server refused a request (4xx): retrying the same request would not help."""


def score_url(url: str) -> str:
    """The address to post to: ``url`` itself, or ``url + "/score"`` when it names only a server
    (``http://host:port`` or ``http://host:port/``)."""
    parts = urlsplit(url)
    if parts.path in ("", "/") and not parts.query:
        return url.rstrip("/") + "/score"
    return url


def _jsonable(value: object) -> object:
    """``json.dumps`` fallback: tensors and arrays (``completion_ids`` in training) as lists, numpy scalars as
    numbers; anything else is an error naming the type."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"a column value of type {type(value).__name__} cannot be sent as JSON")


def request_rows(prompts: list, completions: list, columns: Mapping[str, list]) -> list[dict]:
    """The rows of a batch as ``posttrain score`` reads them: ``prompt``, ``completion``, each extra column,
    and ``completion_ids`` (null when the caller has none)."""
    # A column given as None as a whole (``completion_ids`` when the caller has no token ids) is null per row.
    names = [k for k in columns if k not in ("prompt", "completion")]
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        row = {"prompt": prompt, "completion": completion}
        row.update({name: None if columns[name] is None else columns[name][i] for name in names})
        row.setdefault("completion_ids", None)
        rows.append(row)
    return rows


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


def _server_message(response) -> str:
    """The ``error`` field of a JSON error body, else the body's text (one line, shortened)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), str):
        return _one_line(body["error"])
    return _one_line(response.text) or response.reason_phrase or "(empty body)"


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


class _Failed(Exception):
    """A request that failed for good (retries spent, or a reply that does not follow the format)."""


class RemoteReward:
    """The reward returned by ``remote(...)``: an async callable with TRL's signature."""

    __name__ = "remote"

    def __init__(self, *, url: str, batch_size: int, timeout: float, retries: int, backoff: float,
                 max_backoff: float, concurrency: int, headers: Mapping[str, str]) -> None:
        self.url = score_url(url)
        self.batch_size, self.timeout, self.retries = batch_size, timeout, retries
        self.backoff, self.max_backoff, self.concurrency = backoff, max_backoff, concurrency
        self.headers = {"content-type": "application/json", "accept": "application/json", **headers}

    async def __call__(self, prompts: list, completions: list, trainer_state: object = None,
                       **columns) -> RewardOutput:
        import httpx

        n = len(completions)
        rows = request_rows(list(prompts), list(completions), columns)
        scores: list[float | None] = [None] * n
        info: list[dict] = [{} for _ in range(n)]
        errors: dict[int, str] = {}
        gate = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers) as client:

            async def one(start: int) -> None:
                chunk = rows[start:start + self.batch_size]
                try:
                    replies = await self._post(client, gate, chunk)
                except _Failed as failure:
                    errors.update({start + j: str(failure) for j in range(len(chunk))})
                    return
                for j, reply in enumerate(replies):
                    if "error" in reply and reply["error"] is not None:
                        errors[start + j] = f"{self.url}: {_one_line(reply['error'])}"
                        continue
                    scores[start + j] = reply.get("reward")
                    if isinstance(reply.get("reward_info"), Mapping):
                        info[start + j] = dict(reply["reward_info"])

            tasks = [asyncio.ensure_future(one(start)) for start in range(0, n, self.batch_size)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # a 4xx (or cancellation at the reward's time limit): stop the others too
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return RewardOutput(scores, info, errors)

    async def _post(self, client, gate: asyncio.Semaphore, chunk: list[dict]) -> list[dict]:
        import httpx

        try:
            body = json.dumps({"rows": chunk}, ensure_ascii=False, allow_nan=False, default=_jsonable)
        except (TypeError, ValueError) as err:
            raise _Failed(f"{self.url}: the rows cannot be sent as JSON ({err})") from None
        content = body.encode("utf-8")
        attempts = self.retries + 1
        for attempt in range(attempts):
            wait = min(self.backoff * 2 ** attempt, self.max_backoff)
            started = time.monotonic()
            async with gate:
                try:
                    response = await asyncio.wait_for(client.post(self.url, content=content), self.timeout)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    problem = f"no reply within {self.timeout:g} s"
                except httpx.TransportError as err:
                    problem = f"{type(err).__name__}: {_one_line(str(err)) or 'connection failed'}"
                else:
                    problem = None
            if problem is None:
                status = response.status_code
                if status == 200:
                    return self._replies(response, len(chunk))
                message = _server_message(response)
                if 400 <= status < 500 and status not in RETRIED_STATUS:
                    raise RemoteRewardError(f"{self.url} refused the request (HTTP {status}): {message}")
                problem = f"HTTP {status}: {message}"
                hinted = _retry_after(response)
                if hinted is not None:
                    wait = min(hinted, self.max_backoff)
            if attempt + 1 < attempts:
                log.warning("reward server %s: %s (after %.1f s); retrying in %.2g s (%d of %d)", self.url, problem,
                            time.monotonic() - started, wait, attempt + 1, self.retries)
                await asyncio.sleep(wait)
        raise _Failed(f"{self.url}: {problem} (gave up after {attempts} attempt{'s' * (attempts > 1)})")

    def _replies(self, response, n: int) -> list[dict]:
        """The reply rows of a 200 answer; a ``_Failed`` naming what is wrong when it does not follow the
        format (retrying would not fix a server that answers in another format)."""
        try:
            body = response.json()
        except ValueError:
            raise _Failed(f"{self.url}: the reply is not JSON ({_one_line(response.text)!r})") from None
        rows = body.get("rows") if isinstance(body, Mapping) else None
        if not isinstance(rows, list) or len(rows) != n:
            got = f"{len(rows)} rows" if isinstance(rows, list) else f"a {type(body).__name__}"
            raise _Failed(f"{self.url}: expected a reply {{\"rows\": [...]}} with {n} rows, got {got}")
        for j, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise _Failed(f"{self.url}: reply row {j} is a {type(row).__name__}, expected an object "
                              "with 'reward' and 'reward_info'")
        return rows


@reward_factory
def remote(*, url: str, batch_size: int = 64, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
           max_backoff: float = 30.0, concurrency: int = 4, headers: Mapping[str, str] | None = None
           ) -> RemoteReward:
    """Build the reward.

    ``url``: the server (``http://host:port``, posted to ``/score``) or the full address to post to;
    ``batch_size``: rows per request; ``timeout``: seconds per request (connect to last byte); ``retries``:
    further attempts after a failed one (connection errors, timeouts, 5xx, 408, 429); ``backoff``: the first
    wait in seconds, doubled after each failure, at most ``max_backoff``; ``concurrency``: requests in flight
    at once (per call); ``headers``: extra HTTP headers (e.g. ``{"Authorization": "Bearer ..."}``).
    """
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise UserError(f"remote: url must be an http:// or https:// address, got {url!r}.",
                        hint="For posttrain serve-reward: url=http://127.0.0.1:PORT (the address it prints).")
    for name, value, minimum in (("batch_size", batch_size, 1), ("retries", retries, 0),
                                 ("concurrency", concurrency, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"remote: {name} must be an integer of at least {minimum}, got {value!r}.")
    for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (name == "timeout" and value == 0):
            raise UserError(f"remote: {name} must be a {'positive' if name == 'timeout' else 'non-negative'} "
                            f"number of seconds, got {value!r}.")
    if headers is None:
        headers = {}
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in headers.items()):
        raise UserError(f"remote: headers must be a mapping of header names to strings, got {headers!r}.")
    return RemoteReward(url=url, batch_size=batch_size, timeout=float(timeout), retries=retries,
                        backoff=float(backoff), max_backoff=float(max_backoff), concurrency=concurrency,
                        headers=dict(headers))
