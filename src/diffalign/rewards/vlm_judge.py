"""A vision-language model as the judge, over an OpenAI-compatible chat API (vLLM, SGLang, or any
hosted endpoint): each image is sent with a yes/no question made from its prompt, and the score
is ``P(yes)`` -- from the answer's log-probabilities where the server returns them (``P(yes) /
(P(yes) + P(no))`` over the first answer position whose top tokens include yes or no), else
1.0 / 0.0 from the answer text ("Yes..." / "No..."); an answer that is neither scores NaN, which
online methods count as a failed sample.

Requests run concurrently (at most ``concurrency`` in flight), each retried like the remote
reward (``remote.post_with_retries``: connection errors, timeouts and 502/503/504, ``retries``
times with ``backoff * 2**k`` s sleeps). If any image still has no answer, the call raises
``ConnectionError`` naming the endpoint and how many failed; the answers that did arrive are
kept in a cache, so calling again re-asks only the images that failed.

Plain ``httpx`` rather than the ``openai`` client: ``httpx`` is already in the ``rewards`` extra,
the wire format is a small JSON body, and one retry policy (the remote reward's) stays in one
place instead of being layered over the client's own retries.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import check_range
from .base import Reward, require
from .remote import RetriesExhausted, _detail, post_with_retries

DEFAULT_TEMPLATE = 'Does this image match the description "{prompt}"? Answer with yes or no.'


def _png_base64(image: Tensor) -> str:
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _word(token: str) -> str:
    return token.strip().strip(".,!:;*\"'`").lower()


def p_yes(answer: dict) -> tuple[float, str]:
    """``(P(yes), how)`` from one chat-completion answer (``how``: ``logprobs``, ``text`` or
    ``unparsed``, the score NaN in the last case)."""
    choice = (answer.get("choices") or [{}])[0]
    positions = ((choice.get("logprobs") or {}).get("content")) or []
    for pos in positions:
        cands = list(pos.get("top_logprobs") or []) or [pos]
        yes = sum(math.exp(c["logprob"]) for c in cands if _word(c.get("token", "")) == "yes")
        no = sum(math.exp(c["logprob"]) for c in cands if _word(c.get("token", "")) == "no")
        if yes + no > 0:
            return yes / (yes + no), "logprobs"
    words = str((choice.get("message") or {}).get("content") or "").split()
    text = _word(words[0]) if words else ""
    if text == "yes":
        return 1.0, "text"
    if text == "no":
        return 0.0, "text"
    return float("nan"), "unparsed"


class VLMJudge(Reward):
    """``P(yes)`` of a VLM asked ``template.format(prompt=...)`` about each image (module docstring).

    ``url``: the API base (``http://HOST:PORT/v1``; ``/chat/completions`` is appended);
    ``model``: the served model's name; ``api_key``: sent as ``Authorization: Bearer``;
    ``concurrency``: requests in flight at most; ``timeout`` (s) per attempt; ``retries`` /
    ``backoff`` as the remote reward; ``logprobs`` / ``top_logprobs``: ask for the answer's
    log-probabilities; ``max_tokens`` of the answer; ``cache_size`` answers kept (0: none).
    With ``meta``: ``meta[i]["vlm_judge"] = {"score", "how", "answer"}``.
    """

    name = "vlm_judge"
    differentiable = False

    def __init__(self, url: str | None = None, model: str | None = None, api_key: str | None = None,
                 template: str = DEFAULT_TEMPLATE, system: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, logprobs: bool = True,
                 top_logprobs: int = 5, max_tokens: int = 3, cache_size: int = 4096):
        httpx = require("httpx", "the vlm_judge reward")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"vlm_judge needs url='http://HOST:PORT/v1' of an OpenAI-compatible API, got {url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"vlm_judge needs model=NAME, the model the server serves, got {model!r}")
        if not isinstance(template, str) or "{prompt}" not in template:
            raise ValueError(f"vlm_judge template must be a string containing '{{prompt}}', got {template!r}")
        self.url, self.model, self.template, self.system = url.rstrip("/"), model, template, system
        self.concurrency = check_range("concurrency", concurrency, 1, None, integer=True)
        self.retries = check_range("retries", retries, 0, None, integer=True)
        self.backoff = check_range("backoff", backoff, 0, None)
        self.top_logprobs = check_range("top_logprobs", top_logprobs, 1, 20, integer=True)
        self.max_tokens = check_range("max_tokens", max_tokens, 1, None, integer=True)
        self.cache_size = check_range("cache_size", cache_size, 0, None, integer=True)
        self.logprobs = bool(logprobs)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=check_range("timeout", timeout, 0, None, lo_open=True),
                                    limits=httpx.Limits(max_connections=self.concurrency))
        self._cache: OrderedDict[str, tuple[float, str, str]] = OrderedDict()

    def _body(self, image_b64: str, prompt: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
                   {"type": "text", "text": self.template.format(prompt=prompt)}]
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def _ask(self, image_b64: str, prompt: str) -> tuple[float, str, str]:
        resp = post_with_retries(self._client, f"{self.url}/chat/completions", self._body(image_b64, prompt),
                                 headers=self.headers, retries=self.retries, backoff=self.backoff)
        if resp.status_code in (401, 403):
            raise PermissionError(f"vlm_judge: {self.url} refused the request (HTTP {resp.status_code}: "
                                  f"{_detail(resp)}); pass api_key=")
        if resp.status_code != 200:
            raise RuntimeError(f"vlm_judge: {self.url} answered HTTP {resp.status_code}: {_detail(resp)}")
        answer = resp.json()
        score, how = p_yes(answer)
        text = ((answer.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        return score, how, str(text)[:200]

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        encoded = [_png_base64(im) for im in images]
        keys = [hashlib.sha1(f"{self.model}\0{self.template}\0{p}\0{b}".encode()).hexdigest()
                for p, b in zip(prompts, encoded)]
        todo: dict[str, int] = {}  # one request per distinct (image, prompt) not answered before
        for i, k in enumerate(keys):
            if k not in self._cache:
                todo.setdefault(k, i)
        errors: dict[int, BaseException] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {i: pool.submit(self._ask, encoded[i], prompts[i]) for i in todo.values()}
            for i, fut in futures.items():
                try:
                    self._remember(keys[i], fut.result())
                except (RetriesExhausted, RuntimeError, PermissionError) as e:
                    errors[i] = e
        fatal = [e for e in errors.values() if isinstance(e, PermissionError)]
        if fatal:
            raise fatal[0]
        if errors:
            last = next(iter(errors.values()))
            why = f"{last.attempts} attempts each, last error: {last.last}" if isinstance(last, RetriesExhausted) \
                else str(last)
            raise ConnectionError(f"vlm_judge: {len(errors)} of {len(todo)} requests to {self.url} failed ({why}); "
                                  f"the {len(todo) - len(errors)} answers received are cached, so a new call "
                                  "asks again only for the failed images")
        out = [self._cache[k] for k in keys]
        if meta is not None:
            for m, (s, how, text) in zip(meta, out):
                m["vlm_judge"] = {"score": s, "how": how, "answer": text}
        if self.cache_size == 0:
            self._cache.clear()
        return torch.tensor([s for s, _, _ in out], dtype=torch.float32)

    def _remember(self, key: str, value: tuple[float, str, str]) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while self.cache_size and len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._client.close()
