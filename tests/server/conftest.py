"""One real `dspark serve` process for the whole session, driven over HTTP.

The server runs the embedded default model on one torch thread (the CI
machine has two cores and the test client needs one). Its log goes to a
file; a failing test can read it, and the access-log test does.
"""

from __future__ import annotations

import httpx
import pytest

from server_helpers import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(
        ["--max-model-len", "2048", "--max-num-seqs", "16", "--kv-cache-memory", "256MiB",
         "--api-key", API_KEY, "--shutdown-grace-period", "5"],
        log,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]
