"""Rewards over HTTP: serve any registry reward (``diffalign serve-reward``) and call it remotely
(``rewards.get("remote", url=...)``), e.g. to keep a large reward model on another GPU/process.

Wire protocol (JSON over HTTP):

* ``POST /score``: request ``{"prompts": [str], "images": <base64 of a .npy file>}``, the ``.npy``
  holding a ``[B, 3, H, W]`` array of dtype ``float32`` / ``float16`` (values in [0, 1]) or
  ``uint8`` (0..255). ``float32`` (the client's default) is exact; ``float16`` halves the bytes
  (error <= 2.5e-4). Response ``{"scores": [float], "reward": name, "n": B}``. Bad input ->
  400 with ``{"detail": message}``.
* ``GET /health``: ``{"status": "ok", "reward", "differentiable", "max_batch", "requests",
  "batches"}`` (no token needed).
* With ``--token T`` every ``/score`` call needs ``Authorization: Bearer T``: missing -> 401,
  wrong -> 403.

The server batches: requests arriving while a batch runs (or within ``max_wait_ms``) are
concatenated, up to ``max_batch`` images per reward call (same image size per batch), and
the reward runs in one worker thread, so it never runs concurrently with itself.

The client retries connection errors, timeouts and 502/503/504 answers ``retries`` times, sleeping
``backoff * 2**attempt`` seconds between attempts, then raises ``ConnectionError`` naming the URL.
"""


import asyncio
import base64
import io
import secrets
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import check_choice, check_range
from .base import Reward, check_inputs, require

RETRY_STATUS = (502, 503, 504)


def encode_images(images: Tensor, dtype: str = "float32") -> str:
    """``[B, 3, H, W]`` tensor -> base64 ``.npy`` bytes (``float32``, ``float16`` or ``uint8``)."""
    check_choice("dtype", dtype, ("float32", "float16", "uint8"))
    x = images.detach().float().cpu()
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy() if dtype == "uint8" else x.numpy().astype(dtype)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(data: str) -> Tensor:
    """Inverse of :func:`encode_images`; raises ``ValueError`` on anything else."""
    try:
        arr = np.load(io.BytesIO(base64.b64decode(data, validate=True)), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"images must be a base64-encoded .npy array ({type(e).__name__}: {e})") from e
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"images .npy must be float32, float16 or uint8, got {arr.dtype}")
    return torch.from_numpy(arr.astype(np.float32))


class _Batcher:
    """Collects queued requests into batches of at most ``max_batch`` images and scores them in a
    single worker thread."""

    def __init__(self, reward: Any, max_batch: int, max_wait_ms: float):
        self.reward, self.max_batch, self.max_wait = reward, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = self.batches = 0

    async def submit(self, images: Tensor, prompts: list[str]) -> list[float]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((images, prompts, fut))
        self.requests += 1
        return await fut

    def _run(self, images: Tensor, prompts: list[str]) -> list[float]:
        with torch.no_grad():
            return [float(v) for v in self.reward(images, prompts)]

    async def worker(self) -> None:
        while True:
            items = [await self.queue.get()]
            n = items[0][0].shape[0]
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait() if time.monotonic() >= deadline else \
                        await asyncio.wait_for(self.queue.get(), deadline - time.monotonic())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                items.append(item)
                n += item[0].shape[0]
            groups: dict[tuple, list] = {}
            for it in items:  # one reward call per image size
                groups.setdefault(tuple(it[0].shape[1:]), []).append(it)
            for group in groups.values():
                await self._score_group(group)

    async def _score_group(self, group: list) -> None:
        images = torch.cat([g[0] for g in group])
        prompts = [p for g in group for p in g[1]]
        try:
            scores: list[float] = []
            for i in range(0, len(prompts), self.max_batch):
                self.batches += 1
                scores += await asyncio.to_thread(self._run, images[i:i + self.max_batch],
                                                  prompts[i:i + self.max_batch])
        except Exception as e:  # noqa: BLE001 - hand the error to every waiting request
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(e)
            return
        start = 0
        for imgs, _, fut in group:
            if not fut.done():
                fut.set_result(scores[start:start + imgs.shape[0]])
            start += imgs.shape[0]


def create_app(reward: Any, token: str | None = None, max_batch: int = 64, max_wait_ms: float = 5.0) -> Any:
    """A FastAPI app serving ``reward`` (see the module docstring for the protocol)."""
    fastapi = require("fastapi", "serve-reward")
    from contextlib import asynccontextmanager

    from fastapi.responses import JSONResponse

    check_range("max_batch", max_batch, 1, None, integer=True)
    state: dict[str, _Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        batcher = _Batcher(reward, max_batch, max_wait_ms)
        task = asyncio.create_task(batcher.worker())
        state["batcher"] = batcher
        try:
            yield
        finally:
            task.cancel()

    app = fastapi.FastAPI(title=f"diffalign reward server: {reward.name}", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        b = state.get("batcher")
        return {"status": "ok", "reward": reward.name, "differentiable": bool(reward.differentiable),
                "max_batch": max_batch, "requests": b.requests if b else 0, "batches": b.batches if b else 0}

    @app.post("/score")
    async def score(request: fastapi.Request) -> Any:
        if token is not None:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return JSONResponse({"detail": "missing bearer token (Authorization: Bearer TOKEN)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            if not secrets.compare_digest(auth[len("Bearer "):].encode(), token.encode()):
                return JSONResponse({"detail": "invalid token"}, status_code=403)
        try:
            body = await request.json()
            if not isinstance(body, dict) or "images" not in body or "prompts" not in body:
                raise ValueError("request body must be a JSON object with 'images' and 'prompts'")
            images = decode_images(body["images"])
            prompts = check_inputs(images, body["prompts"], name=reward.name)
            scores = await state["batcher"].submit(images, prompts)
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        return {"scores": scores, "reward": reward.name, "n": len(scores)}

    return app


def serve_reward(name: str, path: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 token: str | None = None, max_batch: int = 64, max_wait_ms: float = 5.0,
                 **reward_kwargs: Any) -> None:
    """Build registry reward ``name`` (``path`` passed through if given) and serve it (blocks)."""
    from .registry import get

    uvicorn = require("uvicorn", "serve-reward")
    check_range("port", port, 0, 65535, integer=True)
    kwargs = dict(reward_kwargs, **({"path": path} if path is not None else {}))
    reward = get(name, **kwargs)
    uvicorn.run(create_app(reward, token, max_batch, max_wait_ms), host=host, port=port, log_level="warning")


class BackgroundServer:
    """Run a reward server in a daemon thread (tests, in-process serving): ``start()`` / ``stop()``."""

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_batch: int = 64, max_wait_ms: float = 5.0):
        uvicorn = require("uvicorn", "serve-reward")
        if port == 0:
            import socket

            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        cfg = uvicorn.Config(create_app(reward, token, max_batch, max_wait_ms), host=host, port=port,
                             log_level="error", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"reward server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


class RemoteReward(Reward):
    """A reward computed by a ``diffalign serve-reward`` server at ``url`` (not differentiable).

    ``timeout`` (s) per HTTP attempt; ``retries`` extra attempts after a connection error, timeout
    or 502/503/504, sleeping ``backoff * 2**attempt`` s between them; ``dtype`` of the image
    payload (``float32`` exact, ``float16`` half the bytes, ``uint8`` a quarter).
    """

    name = "remote"
    differentiable = False

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, dtype: str = "float32"):
        httpx = require("httpx", "the remote reward")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward needs url='http://HOST:PORT' of a `diffalign serve-reward` server, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = check_range("timeout", timeout, 0, None, lo_open=True)
        self.retries = check_range("retries", retries, 0, None, integer=True)
        self.backoff = check_range("backoff", backoff, 0, None)
        self.dtype = check_choice("dtype", dtype, ("float32", "float16", "uint8"))
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout)

    def _post(self, payload: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = post_with_retries(self._client, f"{self.url}/score", payload, headers=headers,
                                     retries=self.retries, backoff=self.backoff)
        except RetriesExhausted as e:
            raise ConnectionError(f"reward server at {self.url} is unreachable after {e.attempts} attempts "
                                  f"(last error: {e.last}); is `diffalign serve-reward` running there?") from None
        detail = _detail(resp)
        if resp.status_code in (401, 403):
            raise PermissionError(f"reward server at {self.url} refused the request (HTTP {resp.status_code}: "
                                  f"{detail}); pass the server's token=")
        if resp.status_code == 400:
            raise ValueError(f"reward server at {self.url} rejected the input: {detail}")
        if resp.status_code != 200:
            raise RuntimeError(f"reward server at {self.url} failed (HTTP {resp.status_code}: {detail})")
        return resp.json()

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        out = self._post({"prompts": prompts, "images": encode_images(images, self.dtype)})
        scores = out.get("scores")
        if not isinstance(scores, list) or len(scores) != len(prompts):
            raise RuntimeError(f"reward server at {self.url} returned a malformed answer: {str(out)[:200]}")
        return torch.tensor(scores, dtype=torch.float32)

    def health(self) -> dict:
        """The server's ``/health`` answer (raises ``ConnectionError`` naming the URL if down)."""
        try:
            return self._client.get(f"{self.url}/health").json()
        except self._httpx.TransportError as e:
            raise ConnectionError(f"reward server at {self.url} is unreachable ({e})") from e

    def close(self) -> None:
        self._client.close()


class RetriesExhausted(ConnectionError):
    """Every attempt of :func:`post_with_retries` failed; ``last`` is the last error, ``attempts``
    how many were made."""

    def __init__(self, url: str, attempts: int, last: str):
        super().__init__(f"{url}: {attempts} attempts failed (last error: {last})")
        self.url, self.attempts, self.last = url, attempts, last


def post_with_retries(client: Any, url: str, payload: dict, *, headers: dict | None = None, retries: int = 3,
                      backoff: float = 0.5) -> Any:
    """POST ``payload`` as JSON with an ``httpx.Client``; connection errors, timeouts and
    502/503/504 answers are retried ``retries`` times, sleeping ``backoff * 2**k`` s before retry
    ``k + 1``. Returns the first other response (the caller reads its status); raises
    :class:`RetriesExhausted` when every attempt failed. Shared by the remote reward and the
    VLM judge (thread-safe: ``httpx.Client`` may be shared by threads)."""
    import httpx

    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            resp = client.post(url, json=payload, headers=headers or {})
        except httpx.TransportError as e:  # connection refused/reset, timeouts
            last = f"{type(e).__name__}: {e}"
            continue
        if resp.status_code in RETRY_STATUS:
            last = f"HTTP {resp.status_code}: {_detail(resp)}"
            continue
        return resp
    raise RetriesExhausted(url, retries + 1, last)


def _detail(resp: Any) -> str:
    try:
        return str(resp.json().get("detail", resp.text))[:300]
    except Exception:  # noqa: BLE001
        return resp.text[:300]
