"""The page with live claims, in a real browser (headless Debian chromium, as ``test_serving_page.py``): a sentence
of the streamed answer is tinted by its confidence before the answer ends, and at the end every sentence is, with
the final answer's claims."""

from __future__ import annotations

import pytest
from test_serving_page import ANSWER_TIMEOUT_S, browser, entry_of, wait_for  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.slow  # starts the vLLM server, drives a browser

LIVE_QUESTION = "Tell me about Paris in five sentences."


def test_a_sentence_is_tinted_before_the_answer_ends(browser, base_url) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(f"{base_url}/semgrad")
    wait_for(lambda: driver.execute_script("return document.body.dataset.loaded === 'true'"), 60, "the page to load")
    driver.execute_script(
        "document.getElementById('max-tokens').value = '200'; document.getElementById('keep-context').checked = false"
    )
    before = len(driver.find_elements(By.CSS_SELECTOR, ".answer"))
    question = driver.find_element(By.ID, "question")
    question.send_keys(LIVE_QUESTION)
    question.send_keys(Keys.ENTER)
    card = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".answer")[before:], 30, "the answer card")[0]
    # read in one script, as the page re-renders the streaming text on every chunk: the card's state, its tinted
    # sentences and the first one's background
    seen = """const claims = arguments[0].querySelectorAll('.answer-text .claim');
        return [arguments[0].dataset.state, claims.length,
                claims.length ? getComputedStyle(claims[0]).backgroundColor : null]"""
    state, tinted, background = wait_for(
        lambda: (lambda s: s if s[1] or s[0] != "streaming" else None)(driver.execute_script(seen, card)),
        ANSWER_TIMEOUT_S,
        "a tinted sentence or the answer's end",
    )
    assert state == "streaming" and tinted >= 1  # tinted while the answer was still streaming
    assert background not in ("rgba(0, 0, 0, 0)", "transparent")
    wait_for(lambda: card.get_attribute("data-state") != "streaming", ANSWER_TIMEOUT_S, "the answer's end")
    assert card.get_attribute("data-state") == "done", card.text
    entry = entry_of(base_url, card.get_attribute("data-completion-id"))
    claims = entry["semgrad"]["claims"]
    spans = card.find_elements(By.CSS_SELECTOR, ".answer-text .claim")
    assert [s.get_attribute("textContent") for s in spans] == [c["text"] for c in claims]
    assert [float(s.get_attribute("data-confidence")) for s in spans] == [c["confidence"] for c in claims]
    assert card.find_element(By.CSS_SELECTOR, ".answer-text").get_attribute("textContent") == entry["answer"]
    assert int(card.get_attribute("data-live-claims")) < len(claims)  # the last sentence came with the end
