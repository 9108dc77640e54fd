"""The naive baseline: a minimal FastAPI + httpx passthrough proxy (what one writes first).

``UPSTREAM=http://127.0.0.1:9000 uvicorn naive_proxy:app`` (run from the bench venv).
"""

import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

app = FastAPI()
client = httpx.AsyncClient(base_url=os.environ["UPSTREAM"], timeout=600,
                           limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000))


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.post("/v1/{path:path}")
async def proxy(path: str, request: Request):
    body = await request.body()
    req = client.build_request("POST", f"/v1/{path}", content=body,
                               headers={"content-type": "application/json"})
    resp = await client.send(req, stream=True)
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")
    data = await resp.aread()
    await resp.aclose()
    return Response(data, status_code=resp.status_code, media_type="application/json")
