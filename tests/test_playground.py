"""The playground (GET /api/v3/ui) through Envoy, against a real server, in a real headless Chromium.

What the page draws is read back from its canvases and compared with the API's own answers to the
same requests: heatmap pixels inverted through the documented colour scale give the scores, contact
map grey levels give the probabilities. Its CSV download is compared byte for byte with `esm2
score`'s for the same variants. Screenshots go to each test's temporary directory.
"""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from support import ESM2_COMMAND, ServerProcess, browser_wait, chromium, free_port, needs_browser

from gateway.envoy_config import DOCS_CONTENT_SECURITY_POLICY, GatewayConfig
from gateway.launch import EnvoyProcess

MODEL = "esm2-tiny"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the page's heatmap rows, top to bottom
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


def _gateway(tmp: Path, tiny_checkpoint: Path, *server_args: str):
    server = ServerProcess(tmp, "--models", MODEL, "--checkpoint", f"{MODEL}={tiny_checkpoint}", "--access-log",
                           *server_args).wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port),
                         log_path=tmp / "envoy.log").wait_listening()
    return server, envoy


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    server, envoy = _gateway(tmp_path_factory.mktemp("playground"), tiny_checkpoint)
    yield server, envoy
    envoy.stop()
    server.stop()


@pytest.fixture
def browser(tmp_path):
    (tmp_path / "downloads").mkdir()
    driver = chromium(tmp_path / "profile", downloads=tmp_path / "downloads", window="1400,2200")
    yield driver
    driver.quit()


def scan_variants(sequence: str) -> list[str]:
    """Every substitution at every position, in the page's order (position, then AMINO_ACIDS)."""
    return [f"{wt}{position + 1}{aa}" for position, wt in enumerate(sequence) for aa in AMINO_ACIDS if aa != wt]


def api(envoy, action: str, body: dict) -> dict:
    response = requests.post(f"{envoy.url}/api/v3/{MODEL}/{action}/", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def run_page(browser, envoy, sequence: str, block: int = 32, scan: bool = True, timeout: float = 120) -> str:
    """Open the playground, paste `sequence`, press Run; the progress line once the run stops."""
    from selenium.webdriver.common.by import By

    browser.get(envoy.url + "/api/v3/ui")
    browser_wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    browser.find_element(By.ID, "sequence").send_keys(sequence)
    field = browser.find_element(By.ID, "block")
    field.clear()
    field.send_keys(str(block))
    if not scan:
        browser.find_element(By.ID, "scan").click()
    browser.find_element(By.ID, "run").click()
    browser_wait(browser, lambda d: not d.find_element(By.ID, "cancel").is_enabled(), timeout)
    return browser.find_element(By.ID, "progress-text").text


def canvas_pixels(browser, canvas_id: str, points: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    found = browser.execute_script(
        "const ctx = document.getElementById(arguments[0]).getContext('2d');"
        "return arguments[1].map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));",
        canvas_id, points)
    return [tuple(p) for p in found]


def geometry(browser, canvas_id: str) -> dict:
    return browser.execute_script("return Object.assign({}, document.getElementById(arguments[0]).dataset)", canvas_id)


def cell_centres(shape: dict, columns: int, rows: int) -> list[tuple[int, int]]:
    left, top, width, height = (int(shape[k]) for k in ("left", "top", "cellWidth", "cellHeight"))
    return [(left + c * width + width // 2, top + r * height + height // 2) for c in range(columns) for r in range(rows)]


def decode_score(pixel: tuple[int, int, int], scale_max: float) -> float:
    """The documented scale inverted: blue (f, f, 255) is -(1 - f/255) m, red (255, f, f) is (1 - f/255) m."""
    red, green, blue = pixel
    if red == 255 and green == blue:
        return (1 - green / 255) * scale_max
    assert blue == 255 and red == green, f"{pixel} is not on the colour scale"
    return -(1 - red / 255) * scale_max


def no_policy_violations(browser) -> None:
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations, violations


def downloaded(directory: Path, suffix: str) -> Path:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(None, 30, poll_frequency=0.1).until(
        lambda _: next((p for p in directory.iterdir() if p.name.endswith(suffix)), None))


def test_the_page_comes_through_envoy_under_the_policy_and_short_paths_redirect(served):
    _, envoy = served
    page = requests.get(envoy.url + "/api/v3/ui", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == DOCS_CONTENT_SECURITY_POLICY
    assert "<script>" not in page.text and "style=" not in page.text
    assert 'data-api-keys="off"' in page.text
    module = requests.get(envoy.url + "/api/v3/ui/playground.js", timeout=30)
    assert module.status_code == 200 and module.headers["content-type"].startswith("application/javascript")
    assert module.headers["content-security-policy"] == DOCS_CONTENT_SECURITY_POLICY
    unknown = requests.get(envoy.url + "/api/v3/ui/secrets.txt", timeout=30)
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    for path, target in [("/", "/api/v3/ui"), ("/ui", "/api/v3/ui"), ("/ui/", "/api/v3/ui"),
                         ("/docs", "/api/v3/docs"), ("/docs/", "/api/v3/docs")]:
        moved = requests.get(envoy.url + path, allow_redirects=False, timeout=30)
        assert moved.status_code == 302 and moved.headers["location"].endswith(target), (path, moved.headers)
    assert requests.get(envoy.url + "/", timeout=30).url == envoy.url + "/api/v3/ui"
    assert requests.head(envoy.url + "/ui", timeout=30).status_code == 302
    posted = requests.post(envoy.url + "/ui", json={}, allow_redirects=False, timeout=30)
    assert posted.status_code == 404  # a path of no method, as before


@needs_browser
def test_what_the_page_draws_is_what_the_api_answered(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    server, envoy = served
    # Blocks of 4 positions: the scan goes out in 6 requests.
    status = run_page(browser, envoy, f">known protein\n{SEQUENCE[:11]}\n{SEQUENCE[11:]}\n", block=4)
    assert status.startswith(f"done: {len(SEQUENCE)} residues, {len(SEQUENCE)} positions scanned"), status
    browser.save_screenshot(str(tmp_path / "playground-22.png"))
    assert not browser.find_element(By.ID, "api-key-field").is_displayed()  # no keys on this server
    assert "RANDOM WEIGHTS" in browser.find_element(By.ID, "model-note").text
    assert server.log().count(f"ScoreJson {MODEL} OK") >= 6

    # Heatmap: every cell's colour, inverted through the scale, is the API's score within half a step.
    variants = scan_variants(SEQUENCE)
    expected = dict(zip(variants, api(envoy, "score", {"items": [{"sequence": SEQUENCE, "variants": variants}]})["scores"]))
    scale_max = max(abs(s) for s in expected.values())
    shape = geometry(browser, "heatmap")
    assert shape["rows"] == AMINO_ACIDS and float(shape["scaleMax"]) == scale_max
    pixels = canvas_pixels(browser, "heatmap", cell_centres(shape, len(SEQUENCE), 20))
    for index, pixel in enumerate(pixels):
        position, row = divmod(index, 20)
        wild_type, substitute = SEQUENCE[position], AMINO_ACIDS[row]
        if wild_type == substitute:
            assert pixel == (0, 0, 0), f"wild type {wild_type}{position + 1} is not marked black: {pixel}"
            continue
        score = expected[f"{wild_type}{position + 1}{substitute}"]
        assert abs(decode_score(pixel, scale_max) - score) <= 0.5 / 255 * scale_max + 1e-12, (position, substitute)

    # Hover names the cell and its value.
    heatmap = browser.find_element(By.ID, "heatmap")
    x, y = cell_centres(shape, len(SEQUENCE), 20)[4 * 20 + AMINO_ACIDS.index("W")]
    ActionChains(browser).move_to_element_with_offset(heatmap, x - heatmap.size["width"] // 2,
                                                      y - heatmap.size["height"] // 2).perform()
    assert browser.find_element(By.ID, "heatmap-readout").text == f"Y5W: masked_marginal {expected['Y5W']:.4f}"

    # Contact map: each cell's grey is 255 x (1 - p) of the returned matrix.
    encoded = api(envoy, "encode", {"params": {"include": ["contacts", "logits"]}, "items": [{"sequence": SEQUENCE}]})
    contacts = np.array(encoded["contacts"])
    greys = np.array([p[0] for p in canvas_pixels(browser, "contacts",
                                                  cell_centres(geometry(browser, "contacts"), len(SEQUENCE), len(SEQUENCE)))])
    greys = greys.reshape(len(SEQUENCE), len(SEQUENCE)).T  # centres came column by column
    assert np.array_equal(greys, np.floor(255 * (1 - contacts) + 0.5)), "contact map differs from the matrix"
    # Random weights give p within ~0.03 of each other: a few grey levels, so rounding caps the correlation.
    assert np.corrcoef(255 - greys.ravel(), contacts.ravel())[0, 1] > 0.95

    # Per-residue track, read from its hover: the wild type's log-probability and the entropy.
    logits = np.array(encoded["logits"], dtype=np.float64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    track, track_shape = browser.find_element(By.ID, "track"), geometry(browser, "track")
    position = 9
    x = int(track_shape["left"]) + position * int(track_shape["cellWidth"]) + int(track_shape["cellWidth"]) // 2
    ActionChains(browser).move_to_element_with_offset(track, x - track.size["width"] // 2, 0).perform()
    letter = SEQUENCE[position]
    wild_type_log_prob = log_probs[position, encoded["vocab_tokens"].index(letter)]
    entropy = -(np.exp(log_probs[position]) * log_probs[position]).sum()
    assert browser.find_element(By.ID, "track-readout").text == \
        f"{letter}{position + 1}: log p({letter}) {wild_type_log_prob:.4f}, entropy {entropy:.4f}"

    # Downloads: the scan CSV equals `esm2 score --scan`'s for the same sequence; the raw JSON holds
    # the API's answers; each panel's PNG is the canvas.
    downloads = tmp_path / "downloads"
    browser.find_element(By.ID, "download-csv").click()
    page_csv = downloaded(downloads, "-scan.csv").read_bytes()
    cli_csv = tmp_path / "cli.csv"
    subprocess.run([*ESM2_COMMAND, "score", "--server", server.target, "--model", MODEL, "--sequence", SEQUENCE,
                    "--scan", "-o", str(cli_csv), "--quiet"], check=True, timeout=120)
    assert page_csv == cli_csv.read_bytes()
    assert [row["variant"] for row in csv.DictReader(page_csv.decode().splitlines())] == variants

    browser.find_element(By.ID, "download-json").click()
    raw = json.loads(downloaded(downloads, ".json").read_text())
    assert raw["sequence"] == SEQUENCE and raw["name"] == "known" and raw["model"] == MODEL
    assert raw["encode"]["response"]["results"][0]["contacts"] == encoded["contacts"]
    assert [s for block in raw["score"] for s in block["response"]["results"][0]["scores"]] == list(expected.values())

    browser.find_element(By.CSS_SELECTOR, "button.png[data-canvas='heatmap']").click()
    png = downloaded(downloads, "-heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == \
        (heatmap.get_property("width"), heatmap.get_property("height"))
    no_policy_violations(browser)


@needs_browser
def test_a_bad_letter_shows_the_apis_message_and_request_id(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server, envoy = served
    status = run_page(browser, envoy, "MKT1AY")
    assert status == "stopped by an error"
    refused = requests.post(f"{envoy.url}/api/v3/{MODEL}/encode/", timeout=30,
                            json={"params": {"include": ["contacts", "logits"]}, "items": [{"sequence": "MKT1AY"}]})
    assert refused.status_code == 400
    assert browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "error-status").text == "400 INVALID_ARGUMENT:"
    assert browser.find_element(By.ID, "error-detail").text == refused.json()["detail"]
    assert "items[0].sequence" in refused.json()["detail"] and "'1'" in refused.json()["detail"]
    request_id = browser.find_element(By.ID, "error-request-id").text
    assert re.fullmatch(r"[0-9a-f-]{36}", request_id) and request_id != refused.json()["request_id"]
    assert f"[request_id={request_id}]" in server.log()  # the id of the page's own request
    browser.save_screenshot(str(tmp_path / "playground-400.png"))
    # Two FASTA records: refused on the page, before any request.
    field = browser.find_element(By.ID, "sequence")
    field.clear()
    field.send_keys(">a\nMKT\n>b\nMKV\n")
    browser.find_element(By.ID, "run").click()
    browser_wait(browser, lambda d: d.find_element(By.ID, "error-status").text == "Input:")
    assert browser.find_element(By.ID, "error-detail").text == "paste one FASTA record; found 2"
    assert not browser.find_element(By.ID, "error-request-id").is_displayed()
    no_policy_violations(browser)


@needs_browser
def test_cancel_stops_the_scan_between_blocks(served, browser):
    from selenium.webdriver.common.by import By

    server, envoy = served
    rng = random.Random(7)
    sequence = "".join(rng.choice(AMINO_ACIDS) for _ in range(120))
    browser.get(envoy.url + "/api/v3/ui")
    browser_wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    browser.find_element(By.ID, "sequence").send_keys(sequence)
    browser.find_element(By.ID, "block").clear()
    browser.find_element(By.ID, "block").send_keys("1")
    browser.find_element(By.ID, "run").click()
    browser_wait(browser, lambda d: int((re.search(r"\((\d+) of 120 scored", d.find_element(By.ID, "progress-text").text)
                                         or [0, 0])[1]) >= 3)
    browser.find_element(By.ID, "cancel").click()
    status = browser_wait(browser, lambda d: re.search(r"cancelled after .*: (\d+) of 120 positions scanned",
                                                       d.find_element(By.ID, "progress-text").text))
    scanned = int(status.group(1))
    assert 3 <= scanned < 120
    # The heatmap holds exactly the blocks that came back; the rest stays grey.
    pixels = canvas_pixels(browser, "heatmap", cell_centres(geometry(browser, "heatmap"), len(sequence), 20))
    scored_positions = {i // 20 for i, p in enumerate(pixels) if p not in ((221, 221, 221), (0, 0, 0))}
    assert scored_positions == set(range(scanned))
    assert browser.find_element(By.ID, "run").is_enabled()


API_KEY = "playground-key-5d1e"


@needs_browser
def test_the_key_field_appears_only_when_keys_are_on_and_is_sent(tmp_path_factory, tiny_checkpoint, browser):
    from selenium.webdriver.common.by import By

    tmp = tmp_path_factory.mktemp("playground-keys")
    (tmp / "keys.txt").write_text(API_KEY + "\n")
    server, envoy = _gateway(tmp, tiny_checkpoint, "--api-keys-file", str(tmp / "keys.txt"))
    try:
        assert run_page(browser, envoy, SEQUENCE, scan=False) == "stopped by an error"
        assert browser.find_element(By.ID, "api-key-field").is_displayed()
        assert browser.find_element(By.ID, "error-status").text.startswith("401")
        assert "API key" in browser.find_element(By.ID, "error-detail").text
        browser.find_element(By.ID, "api-key").send_keys(API_KEY)
        browser.find_element(By.ID, "run").click()
        browser_wait(browser, lambda d: d.find_element(By.ID, "progress-text").text.startswith("done"))
        assert not browser.find_element(By.ID, "error").is_displayed()
    finally:
        envoy.stop()
        server.stop()


@needs_browser
def test_a_300_residue_protein_screenshot(served, browser, tmp_path):
    """The issue's picture: the whole page for a 300-residue protein, every cell scanned."""
    _, envoy = served
    rng = random.Random(300)
    sequence = "".join(rng.choice(AMINO_ACIDS) for _ in range(300))
    status = run_page(browser, envoy, f">random300\n{sequence}", timeout=300)
    assert status.startswith("done: 300 residues, 300 positions scanned"), status
    pixels = canvas_pixels(browser, "heatmap", cell_centres(geometry(browser, "heatmap"), 300, 20))
    assert (221, 221, 221) not in pixels and pixels.count((0, 0, 0)) == 300
    screenshot = tmp_path / "playground-300.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 50_000
    no_policy_violations(browser)
