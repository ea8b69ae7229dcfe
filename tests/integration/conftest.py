"""Fixtures shared by the server's in-process tests: the app built from the requesting module's
``config`` fixture, and a client that sends the token and waits until the model is loaded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def app(config):
    from mukv.serve import create_app

    return create_app(config)


@pytest.fixture(scope="module")
def client(app) -> Iterator:
    from fastapi.testclient import TestClient

    from tests.integration.test_serve_app import AUTH, wait_ready

    with TestClient(app, headers=AUTH) as test_client:
        wait_ready(test_client)
        yield test_client
