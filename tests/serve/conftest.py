"""Servers shared by the serve tests. The default one runs the demo MoE with a 512-token
context (a prompt over it is cheap to build); `locked_server` adds --api-key, a one-request
queue and CORS for one origin, and also offers the Q8_0 demo so that a request can switch
models. Each is stopped with Ctrl-C, which must exit 0 with no traceback."""

from __future__ import annotations

import pytest

from serve.harness import API_KEY, ORIGIN, Server


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """An empty hub cache: the servers list only the models their command line names."""
    return str(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def server(demo_model, hub_cache):
    srv = Server("--ctx", "512", env={"HF_HUB_CACHE": hub_cache}).wait_ready()
    yield srv
    assert srv.interrupt() == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


@pytest.fixture(scope="module")
def locked_server(demo_model, demo_model_q8, hub_cache):
    srv = Server(str(demo_model_q8), str(demo_model), "--ctx", "512", "--api-key", API_KEY,
                 "--queue", "1", "--cors", ORIGIN, env={"HF_HUB_CACHE": hub_cache}).wait_ready()
    yield srv
    assert srv.interrupt() == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr
