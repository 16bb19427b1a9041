"""Remote rewards: the HTTP server (batching, auth, errors) and the retrying client.

Every server here listens on 127.0.0.1 on a free port and is stopped by the test that started it.
"""

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from diffalign import rewards  # noqa: E402
from diffalign.rewards.remote import BackgroundServer, decode_images, encode_images  # noqa: E402
from diffalign.worlds import shapes as W  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data():
    prompts = W.sample_prompts(32, seed=11)
    images, _ = W.render_batch(prompts, seed=4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x[::3] = (x[::3] * 0.7 + 0.3 * torch.rand_like(x[::3])).clamp(0, 1)  # some imperfect images too
    return prompts, x


@pytest.fixture(scope="module")
def server():
    srv = BackgroundServer(rewards.get("shapes"), token="s3cret", max_batch=16).start()
    yield srv
    srv.stop()


def test_payload_roundtrip():
    x = torch.rand(3, 3, 5, 7)
    assert torch.equal(decode_images(encode_images(x)), x)
    assert (decode_images(encode_images(x, "float16")) - x).abs().max() < 5e-4
    assert (decode_images(encode_images(x, "uint8")) - x).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="base64"):
        decode_images("not base64!!")


def test_concurrent_requests_match_the_local_reward(server, data):
    prompts, x = data
    local = rewards.get("shapes")(x, prompts)
    client = rewards.get("remote", url=server.url, token="s3cret", timeout=20)
    results = {}

    def call(i):
        sl = slice(4 * i, 4 * i + 4)
        results[i] = client(x[sl], prompts[sl])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    assert torch.equal(torch.cat([results[i] for i in range(8)]), local)
    h = client.health()
    assert h["status"] == "ok" and h["reward"] == "shapes" and h["requests"] >= 8
    assert client(x[:20], prompts[:20]).tolist() == local[:20].tolist()  # > max_batch: split server-side


def test_requests_are_batched():
    class Slow(rewards.Reward):
        name = "slow_brightness"

        def __init__(self):
            self.calls = []

        def score(self, images, prompts, meta):
            self.calls.append(images.shape[0])
            time.sleep(0.15)
            return images.mean((1, 2, 3))

    slow = Slow()
    srv = BackgroundServer(slow, max_batch=64, max_wait_ms=20).start()
    try:
        client = rewards.get("remote", url=srv.url)
        x = torch.rand(6, 3, 8, 8)
        out = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client(x[i:i + 1], ["p"]))) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert torch.allclose(torch.cat([out[i] for i in range(6)]), x.mean((1, 2, 3)))
        assert sum(slow.calls) == 6 and len(slow.calls) < 6  # several requests shared a reward call
    finally:
        srv.stop()


def test_auth_and_bad_requests(server, data):
    prompts, x = data
    payload = {"prompts": prompts[:2], "images": encode_images(x[:2])}
    url = f"{server.url}/score"
    assert httpx.post(url, json=payload).status_code == 401
    assert httpx.post(url, json=payload, headers={"Authorization": "Bearer wrong"}).status_code == 403
    ok = {"Authorization": "Bearer s3cret"}
    assert httpx.post(url, json=payload, headers=ok).status_code == 200
    bad = httpx.post(url, json={"prompts": prompts[:3], "images": payload["images"]}, headers=ok)
    assert bad.status_code == 400 and "2 images but 3 prompts" in bad.json()["detail"]
    assert httpx.post(url, json={"prompts": ["x"], "images": "%%%"}, headers=ok).status_code == 400
    assert httpx.post(url, json=[1, 2], headers=ok).status_code == 400
    with pytest.raises(PermissionError, match=server.url):
        rewards.get("remote", url=server.url, token="nope")(x[:2], prompts[:2])
    with pytest.raises(ValueError, match="rejected the input"):  # the verifier wants 32x32
        rewards.get("remote", url=server.url, token="s3cret")(x[:2, :, :16, :16], prompts[:2])
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no token


def test_client_survives_a_server_restart(data):
    prompts, x = data
    reward = rewards.get("brightness")
    port = free_port()
    first = BackgroundServer(reward, port=port).start()
    client = rewards.get("remote", url=first.url, retries=8, backoff=0.1, timeout=5, dtype="float16")
    assert torch.allclose(client(x[:4], prompts[:4]), reward(x[:4], prompts[:4]), atol=1e-3)
    first.stop()
    second = BackgroundServer(reward, port=port)
    timer = threading.Timer(0.5, second.start)  # comes back while the client is retrying
    timer.start()
    try:
        t0 = time.monotonic()
        out = client(x[4:8], prompts[4:8])
        assert time.monotonic() - t0 > 0.2  # it really had to wait for the restart
        assert torch.allclose(out, reward(x[4:8], prompts[4:8]), atol=1e-3)
    finally:
        timer.join()
        second.stop()


def test_client_fails_clearly_when_the_server_is_gone(data):
    prompts, x = data
    url = f"http://127.0.0.1:{free_port()}"
    client = rewards.get("remote", url=url, retries=2, backoff=0.01, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"{url}.*3 attempts"):
        client(x[:2], prompts[:2])
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConnectionError, match=url):
        client.health()
    with pytest.raises(ValueError, match="url="):
        rewards.get("remote", url="localhost:80")
    with pytest.raises(ValueError, match="retries"):
        rewards.get("remote", url=url, retries=-1)


@pytest.mark.slow
def test_cli_serve_reward(data):
    prompts, x = data
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffalign", "serve-reward", "brightness", "--host", "127.0.0.1",
                             "--port", str(port), "--token", "tk", "--max-batch", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).json()["max_batch"] == 8:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = rewards.get("remote", url=url, token="tk")
        assert torch.allclose(client(x[:10], prompts[:10]), rewards.get("brightness")(x[:10], prompts[:10]))
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run([sys.executable, "-m", "diffalign", "serve-reward", "nope", "--port", str(port)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "known rewards" in bad.stderr
