"""Malformed and oversized requests get 4xx JSON errors; 200 concurrent requests are all answered."""

import asyncio
import time

import httpx
import openai
from serve_support import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["type"]
    return body


def test_malformed_requests(server):
    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        _error(c.post(url, content=b"{not json", headers=AUTH), 400)
        _error(c.post(url, json=[1, 2], headers=AUTH), 400)
        assert _error(c.post(url, json={"model": MODEL}, headers=AUTH), 400)["param"] == "prompt"
        _error(c.post(url, json={"model": MODEL, "prompt": [1, 2, 3]}, headers=AUTH), 400)
        _error(c.post(url, json={"model": MODEL, "prompt": "x", "stop": ["a"] * 5}, headers=AUTH), 400)
        big = "x" * (server.limits.max_body_bytes + 1)
        _error(c.post(url, json={"model": MODEL, "prompt": big}, headers=AUTH), 413)
        _error(c.post(url, json={"model": MODEL, "prompt": "x"}), 401)
        _error(c.get(f"{server.base_url}/v1/nothing", headers=AUTH), 404)
        assert c.get(f"{server.base_url}/health").json()["status"] == "ok"


def test_prompt_longer_than_context(server):
    url = f"{server.base_url}/v1/completions"
    long_prompt = " a" * 5000  # ~5000 tokens, over tiny-stablelm's 4096 positions, under the body limit
    with httpx.Client(timeout=30) as c:
        assert _error(c.post(url, json={"model": MODEL, "prompt": long_prompt}, headers=AUTH),
                      400)["code"] == "context_length_exceeded"


def test_200_concurrent_requests_all_answered(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(i):
            return await client.completions.create(model=MODEL, prompt=f"def f{i}(", max_tokens=4,
                                                   temperature=0, stream=(i % 4 == 0))

        results = await asyncio.gather(*(one(i) for i in range(200)))
        texts = []
        for r in results:  # streamed ones are async streams: read them to the end
            if isinstance(r, openai.AsyncStream):
                texts.append("".join([c.choices[0].text async for c in r if c.choices]))
            else:
                texts.append(r.choices[0].text)
        await client.close()
        return texts

    t0 = time.perf_counter()
    texts = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    print(f"200 concurrent requests answered in {elapsed:.1f}s")
    assert len(texts) == 200 and all(isinstance(t, str) for t in texts)
    assert elapsed < 60
    assert server.engine.pending == 0
