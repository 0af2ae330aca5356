"""The interactive API docs (GET /api/v3/docs, Swagger UI) through Envoy, in a real headless Chromium.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`; .ci/run
installs them in CI); selenium (dev extra) drives them. Skipped only where they are missing.
"""

from __future__ import annotations

import pytest
import requests
from support import ServerProcess, browser_wait, chromium, free_port, needs_browser

from gateway.envoy_config import DOCS_CONTENT_SECURITY_POLICY, GatewayConfig
from gateway.launch import EnvoyProcess
from service.api.docs_page import SWAGGER_UI_VERSION, vendored

@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_checkpoint):
    assert vendored(), "Swagger UI is not vendored: run `make setup` (python -m service.api.docs_page --vendor)"
    tmp = tmp_path_factory.mktemp("docs")
    server = ServerProcess(tmp, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}").wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port),
                         log_path=tmp / "envoy.log").wait_listening()
    yield envoy
    envoy.stop()
    server.stop()


def test_the_page_and_its_files_come_through_envoy_with_a_content_security_policy(gateway):
    page = requests.get(gateway.url + "/api/v3/docs", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == DOCS_CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline: the policy allows none
    bundle = requests.get(gateway.url + "/api/v3/docs/swagger-ui-bundle.js", timeout=30)
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("application/javascript")
    assert f'"{SWAGGER_UI_VERSION}"' in bundle.text or SWAGGER_UI_VERSION in bundle.text
    missing = requests.get(gateway.url + "/api/v3/docs/..%2fopenapi.json", timeout=30)
    assert missing.status_code in (400, 404)
    unknown = requests.get(gateway.url + "/api/v3/docs/secrets.txt", timeout=30)
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    style = requests.get(gateway.url + "/api/v3/docs/docs.css", timeout=30)
    assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"


API_KEY = "docs-page-key-7f3a"


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory, tiny_checkpoint):
    """The same, with the server requiring an API key."""
    tmp = tmp_path_factory.mktemp("docs-keys")
    keys = tmp / "keys.txt"
    keys.write_text(API_KEY + "\n")
    server = ServerProcess(tmp, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
                           "--api-keys-file", str(keys)).wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port),
                         log_path=tmp / "envoy.log").wait_listening()
    yield envoy
    envoy.stop()
    server.stop()


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "profile")
    yield driver
    driver.quit()


_wait = browser_wait


def _open_encode(driver):
    """The docs page with the encode operation open, in "Try it out", its model filled in."""
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_elements(By.ID, "operations-default-encode"))
    encode = driver.find_element(By.ID, "operations-default-encode")
    encode.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    _wait(driver, lambda d: encode.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))[0].click()
    model = _wait(driver, lambda d: encode.find_elements(By.CSS_SELECTOR, "tr[data-param-name='model'] input"))[0]
    model.send_keys("esm2-tiny")
    return encode


def _execute(driver, operation, body: str):
    """Type `body` into the operation's request body, press Execute; the (status, body) shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    editor = operation.find_element(By.CSS_SELECTOR, "textarea.body-param__text")
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys(Keys.DELETE)
    editor.send_keys(body)
    shown_before = len(operation.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"))
    if shown_before:
        operation.find_element(By.CSS_SELECTOR, "button.btn-clear").click()
        _wait(driver, lambda d: not operation.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"))
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = _wait(driver, lambda d: operation.find_elements(By.CSS_SELECTOR,
                                                             ".live-responses-table tr.response .response-col_status"))[0]
    shown = operation.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre")
    return status.text.strip(), shown.text


@needs_browser
def test_try_it_out_in_a_real_browser(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(gateway.url + "/api/v3/docs")
    _wait(browser, lambda d: d.find_elements(By.ID, "operations-default-encode"))
    listed = browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    assert "/api/v3/{model}/encode/" in listed and "/api/v3/{model}/predict/" in listed

    encode = _open_encode(browser)

    status, shown = _execute(browser, encode, '{"items": [{"sequence": "MKTAYIAKQR"}]}')
    assert status == "200", shown
    assert '"embeddings"' in shown and '"sequence_index"' in shown
    browser.save_screenshot(str(tmp_path / "docs-page-encode-200.png"))

    status, shown = _execute(browser, encode, '{"items": [{"sequence": "MKT1"}]}')
    assert status == "400", shown
    assert '"items[0].sequence"' in shown and '"request_id"' in shown and '"status_code": 400' in shown
    screenshot = tmp_path / "docs-page-encode-400.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    # The page ran under the policy without breaking it (Chromium logs every violation).
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations, violations


@needs_browser
def test_no_padlocks_without_keys_a_random_weights_banner_and_client_links(gateway, keyed_gateway, browser, tmp_path):
    """Without API keys the page shows no padlock and no Authorize button (with keys, both); a model
    with random weights is named in a banner above everything; the page links its client and CLI sections."""
    from selenium.webdriver.common.by import By

    browser.get(gateway.url + "/api/v3/docs")
    _wait(browser, lambda d: d.find_elements(By.ID, "operations-default-encode"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".authorization__btn")  # the padlocks
    assert not browser.find_elements(By.CSS_SELECTOR, ".auth-wrapper button.authorize")
    banner = browser.find_element(By.CSS_SELECTOR, "[role=alert].esm2-random-weights")
    assert banner.is_displayed() and banner.text.startswith("RANDOM WEIGHTS: esm2-tiny has random weights")
    assert banner.location["y"] < browser.find_element(By.ID, "swagger-ui").location["y"]
    for anchor, heading in (("#python-client", "Python client"), ("#command-line", "The esm2 command line")):
        link = browser.find_element(By.CSS_SELECTOR, f"nav.esm2-links a[href='{anchor}']")
        link.click()
        section = browser.find_element(By.CSS_SELECTOR, anchor)
        assert section.find_element(By.TAG_NAME, "h2").text == heading and section.is_displayed()
    assert 'client.encode("esm2-8m", ["MKTAYIAKQR"]' in browser.find_element(By.CSS_SELECTOR, "#python-client pre").text
    assert "esm2 score --sequence MKTAYIAKQR --scan" in browser.find_element(By.CSS_SELECTOR, "#command-line pre").text
    browser.save_screenshot(str(tmp_path / "docs-page-no-keys.png"))

    browser.get(keyed_gateway.url + "/api/v3/docs")
    _wait(browser, lambda d: d.find_elements(By.ID, "operations-default-encode"))
    assert browser.find_elements(By.CSS_SELECTOR, ".authorization__btn")
    assert browser.find_elements(By.CSS_SELECTOR, ".auth-wrapper button.authorize")


@needs_browser
def test_the_authorize_button_sends_the_api_key(keyed_gateway, browser, tmp_path):
    """Before: the document declared no security scheme, so with API keys on, "Try it out" could only
    get 401s. Now Authorize takes the key and Execute sends it."""
    from selenium.webdriver.common.by import By

    browser.get(keyed_gateway.url + "/api/v3/docs")
    encode = _open_encode(browser)
    status, shown = _execute(browser, encode, '{"items": [{"sequence": "MKTAYIAKQR"}]}')
    assert status == "401", shown

    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper button.authorize").click()
    modal = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux"))[0]
    _wait(browser, lambda d: modal.find_elements(By.CSS_SELECTOR, "input"))[0].send_keys(API_KEY)
    modal.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.authorize").click()
    _wait(browser, lambda d: modal.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove authorization']"))
    modal.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.btn-done").click()
    _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, ".modal-ux"))

    status, shown = _execute(browser, encode, '{"items": [{"sequence": "MKTAYIAKQR"}]}')
    assert status == "200", shown
    assert '"embeddings"' in shown
    curl = browser.find_element(By.CSS_SELECTOR, ".curl-command").text
    assert f"Authorization: Bearer {API_KEY}" in curl, curl
    browser.save_screenshot(str(tmp_path / "docs-page-authorized-200.png"))
