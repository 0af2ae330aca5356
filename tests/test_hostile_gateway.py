"""Hostile JSON through a real Envoy next to legitimate callers (issue 9, sections 1 and 3)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import body, post

from service.errors import MAX_MESSAGE_CHARS

HUGE = "x" * 70_000
LEGIT = body(["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMSLFDFFKNKG"])


def legit(envoy, session) -> int:  # a requests.Session, or the requests module
    return session.post(envoy.url + "/api/v3/esm2-tiny/encode/", json=LEGIT, timeout=120).status_code


@pytest.mark.parametrize(
    "hostile,fragment",
    [
        ({**LEGIT, "params": {"include": [HUGE]}}, "params.include[0]: unknown value 'xxx"),
        # Over-long lists are refused by their length, before any value is looked at.
        ({**LEGIT, "params": {"include": ["y" * 300] * 200}}, "params.include: at most 64 values, got 200"),
    ],
    ids=["one-huge-include", "many-includes"],
)
def test_huge_echo_next_to_legitimate_callers(gateway, hostile, fragment):
    """Before: the 70 KB echo overflowed the trailer, Envoy reset the upstream connection and
    8-15 of 20 concurrent legitimate requests got 502."""
    sessions = [requests.Session() for _ in range(20)]
    try:
        with ThreadPoolExecutor(24) as pool:
            good = [pool.submit(legit, gateway, session) for session in sessions for _ in range(2)]
            bad = [pool.submit(post, gateway, "/api/v3/esm2-tiny/encode/", hostile) for _ in range(4)]
            statuses = [future.result(timeout=300) for future in good]
            refused = [future.result(timeout=300) for future in bad]
    finally:
        for session in sessions:
            session.close()
    assert statuses == [200] * len(statuses)
    for response in refused:
        assert response.status_code == 400, response.text[:300]
        message = response.json()["message"]
        assert fragment in message and len(message) <= MAX_MESSAGE_CHARS
        assert "y" * 41 not in message and "x" * 41 not in message  # echoes are cut at 40 characters


def test_huge_model_name_is_answered_with_a_short_message(gateway):
    response = post(gateway, "/api/v3/esm2-tiny/encode/", {**LEGIT, "model": HUGE})
    # The body's model either is refused as such (400) or overrides the path (404); never 5xx, never long.
    assert response.status_code in (400, 404), response.text[:300]
    assert len(response.text) < 4 * MAX_MESSAGE_CHARS
    assert legit(gateway, requests) == 200


@pytest.mark.parametrize("header", ["Authorization", "X-Padding"])
def test_oversized_header_that_envoy_forwards_is_not_429(gateway, header):
    """Before: grpc's metadata limit answered RESOURCE_EXHAUSTED, which Envoy sends as 429
    without Retry-After, although such a request can never succeed."""
    response = requests.post(gateway.url + "/api/v3/esm2-tiny/encode/", json=LEGIT, timeout=60,
                             headers={header: "Token " + "k" * (30 << 10)})
    assert response.status_code in (400, 431), (response.status_code, response.text[:300])
    assert legit(gateway, requests) == 200


def test_long_path_is_not_429_or_5xx(gateway):
    """Before: a 17-59 KB path reached grpc as metadata (the model name and Envoy's
    x-envoy-original-path) over grpc's limit: 429 without Retry-After."""
    response = post(gateway, "/api/v3/" + "m" * (30 << 10) + "/encode/", LEGIT)
    # Envoy's codec counts the request line against its header limit: 431 (or 414 from the edge's path check).
    assert response.status_code in (400, 404, 414, 431), (response.status_code, response.text[:300])
    assert len(response.text) < 4 * MAX_MESSAGE_CHARS
    assert legit(gateway, requests) == 200


def test_large_json_body_is_answered_about_the_body(gateway):
    """A JSON body well over the largest valid request, but within the gateway's body cap,
    gets a 400 naming the item at fault, not a message about its transcoded size."""
    response = post(gateway, "/api/v3/esm2-tiny/encode/", body(["MKJ" + "A" * 600_000]))
    assert response.status_code == 400, response.text[:300]
    assert "items[0].sequence: 600003 residues; at most 2048 are allowed" in response.json()["message"]
