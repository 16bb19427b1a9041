"""VLM judge against a local fake OpenAI-compatible server the test starts: log-probs, plain answers,
errors and retries, slow answers and the concurrency limit."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from diffalign import rewards
from diffalign.rewards.vlm_judge import p_yes


class FakeVLM:
    """A chat-completions endpoint whose behaviour the test sets: ``mode`` (``logprobs``, ``plain``,
    ``odd``), ``fail_first`` requests answered 503, ``delay`` seconds per answer; it records the
    requests and the most requests ever in flight at once."""

    def __init__(self):
        self.mode, self.fail_first, self.delay, self.p = "logprobs", 0, 0.0, 0.8
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, body, self.headers.get("Authorization")))
                    n = len(fake.requests)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                self._counted = True
                try:
                    time.sleep(fake.delay)
                    if n <= fake.fail_first:
                        return self._send(503, {"detail": "overloaded"})
                    question = body["messages"][-1]["content"][1]["text"]
                    yes = "dog" in question
                    if fake.mode == "logprobs":
                        p = fake.p if yes else 1 - fake.p
                        top = [{"token": "Yes", "logprob": math.log(p)}, {"token": " no", "logprob": math.log(1 - p)},
                               {"token": "Maybe", "logprob": -9.0}]
                        choice = {"message": {"content": "Yes" if yes else "No"},
                                  "logprobs": {"content": [{"token": "Yes", "logprob": math.log(p), "top_logprobs": top}]}}
                    else:
                        choice = {"message": {"content": ("Yes, it does." if yes else "No.") if fake.mode == "plain"
                                              else "I cannot tell."}}
                    self._send(200, {"choices": [choice]})
                finally:
                    self._finish()

            def _finish(self):
                # a request stops counting before its answer goes out: the client may send its next request as
                # soon as it has read this one, before this handler thread would get back to the lock
                if getattr(self, "_counted", False):
                    self._counted = False
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, code, payload):
                self._finish()
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    f = FakeVLM()
    yield f
    f.close()


def judge(fake, **kw):
    return rewards.get("vlm_judge", url=fake.url, model="fake-vl", **{"backoff": 0.01, **kw})


PROMPTS = ["a dog on a beach", "a cat on a sofa"]


def test_log_probs_give_p_yes(fake):
    r = judge(fake, api_key="K")
    meta = [{}, {}]
    out = r(torch.rand(2, 3, 16, 16), PROMPTS, meta)
    assert out.tolist() == pytest.approx([0.8, 0.2], abs=1e-6)
    assert meta[0]["vlm_judge"]["how"] == "logprobs"
    # the two requests run concurrently: find the first prompt's by its text, not by arrival order
    dog = [r for r in fake.requests if '"a dog on a beach"' in r[1]["messages"][0]["content"][1]["text"]]
    assert len(dog) == 1 and len(fake.requests) == 2
    path, body, auth = dog[0]
    assert path == "/v1/chat/completions" and auth == "Bearer K" and body["model"] == "fake-vl"
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["temperature"] == 0.0
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_plain_answers_and_unparsed(fake):
    fake.mode = "plain"
    meta = [{}, {}]
    assert judge(fake, logprobs=False)(torch.rand(2, 3, 8, 8), PROMPTS, meta).tolist() == [1.0, 0.0]
    assert meta[1]["vlm_judge"] == {"score": 0.0, "how": "text", "answer": "No."}
    assert "logprobs" not in fake.requests[0][1]
    fake.mode = "odd"
    assert torch.isnan(judge(fake)(torch.rand(1, 3, 8, 8), PROMPTS[:1])).all()


def test_retries_then_success(fake):
    fake.fail_first = 2
    out = judge(fake, retries=3, concurrency=1)(torch.rand(1, 3, 8, 8), PROMPTS[:1])
    assert out.item() == pytest.approx(0.8) and len(fake.requests) == 3


def test_clear_error_after_n_failures_and_nothing_lost(fake):
    r = judge(fake, retries=2, concurrency=1)
    images = torch.rand(3, 3, 8, 8)
    prompts = ["a dog", "a cat", "a dog and a cat"]
    fake.fail_first = 4  # requests 1-4 answer 503: image 0 fails all 3 attempts, image 1 its first
    with pytest.raises(ConnectionError, match=r"vlm_judge: 1 of 3 requests to http://127\.0\.0\.1:\d+/v1 failed "
                                              r"\(3 attempts each, last error: HTTP 503"):
        r(images, prompts)
    assert len(fake.requests) == 3 + 2 + 1  # image 0: 3 failed attempts; image 1: a 4th failure, then an answer
    fake.fail_first = 0
    n = len(fake.requests)
    out = r(images, prompts)
    assert len(fake.requests) == n + 1  # only the failed image is asked again
    assert out.tolist() == pytest.approx([0.8, 0.2, 0.8])


def test_unreachable_endpoint_and_bad_arguments():
    r = rewards.get("vlm_judge", url="http://127.0.0.1:9/v1", model="m", retries=1, backoff=0.0, timeout=2)
    with pytest.raises(ConnectionError, match="2 attempts each"):
        r(torch.rand(1, 3, 8, 8), ["x"])
    with pytest.raises(ValueError, match="model=NAME"):
        rewards.get("vlm_judge", url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="template must be a string containing"):
        rewards.get("vlm_judge", url="http://127.0.0.1:9/v1", model="m", template="Is it good?")


def test_slow_answers_respect_the_concurrency_limit(fake):
    fake.delay = 0.15
    r = judge(fake, concurrency=3)
    prompts = [f"a dog number {i}" for i in range(9)]
    t0 = time.perf_counter()
    out = r(torch.rand(9, 3, 8, 8), prompts)
    elapsed = time.perf_counter() - t0
    assert out.tolist() == pytest.approx([0.8] * 9)
    assert fake.max_in_flight == 3  # reached, never exceeded
    assert elapsed >= 3 * 0.15 * 0.9  # 9 answers, 3 at a time


def test_timeouts_are_retried_then_reported(fake):
    fake.delay = 1.0
    r = judge(fake, timeout=0.2, retries=1)
    with pytest.raises(ConnectionError, match="ReadTimeout"):
        r(torch.rand(1, 3, 8, 8), PROMPTS[:1])
    assert len(fake.requests) == 2


def test_p_yes_parsing():
    lp = {"choices": [{"message": {"content": "**Yes**"}, "logprobs": {"content": [
        {"token": "**", "logprob": -0.1, "top_logprobs": [{"token": "**", "logprob": -0.1}]},
        {"token": "Yes", "logprob": math.log(0.6),
         "top_logprobs": [{"token": "Yes", "logprob": math.log(0.6)}, {"token": "yes", "logprob": math.log(0.1)},
                          {"token": "No", "logprob": math.log(0.1)}]}]}}]}
    assert p_yes(lp) == (pytest.approx(0.875), "logprobs")  # the first position naming yes/no; variants summed
    assert p_yes({"choices": [{"message": {"content": "yes."}}]}) == (1.0, "text")
    assert math.isnan(p_yes({"choices": [{"message": {"content": ""}}]})[0])
