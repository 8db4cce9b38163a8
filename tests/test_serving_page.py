"""The page at ``/semgrad`` and what it reads, against the session's real server (``base_url`` in conftest.py):
the per-token data and the recent answers through the API, then the page in a real browser: Debian's
``chromium``, headless, driven by Selenium through Debian's ``chromium-driver`` (``scripts/bootstrap.sh``
installs both). The browser test saves screenshots at 390 and 1280 px into ``benchmarks/results/``."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from semgrad_serve.errors import ItemError
from semgrad_serve.model.tokens import token_texts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
REQUEST_TIMEOUT_S = 180
ANSWER_TIMEOUT_S = 300  # a streamed answer and its scores on a busy 2-core machine
TOKEN_FIELDS = ("token_texts", "token_entropies", "token_logprobs")
# Per-token values of the same answer scored over vLLM's cached prompt K/V vs recomputed offline, in float32
TOKEN_REL, TOKEN_ABS = 1e-3, 1e-4
PAGE_QUESTION = "Who wrote the novel Moby-Dick? Answer in one sentence."
# Cut after one token, this answer is flagged (5x the threshold here): the flagged filter has something to show.
FLAGGED_QUESTION, FLAGGED_MAX_TOKENS = "What is the capital of France? One word.", 1

pytestmark = pytest.mark.slow  # starts the vLLM server, drives a browser


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def recent(base_url: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/v1/semgrad/recent", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def entry_of(base_url: str, completion_id: str, index: int = 0) -> dict[str, Any]:
    (entry,) = [e for e in recent(base_url)["answers"] if e["completion_id"] == completion_id and e["index"] == index]
    return entry


def without_tokens(semgrad: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in semgrad.items() if k not in TOKEN_FIELDS}


def assert_tokens_equal_offline(semgrad: dict[str, Any], scorer, prompt_ids: list[int], answer_ids: list[int]) -> None:
    """The per-token data of a served answer: the tokenizer's texts, the offline scorer's entropies and log-probs."""
    (offline,) = scorer.score([(prompt_ids, answer_ids)])
    assert not isinstance(offline, ItemError), offline
    assert semgrad["token_texts"] == token_texts(scorer.tokenizer, answer_ids)
    assert "".join(semgrad["token_texts"]) == scorer.tokenizer.decode(answer_ids, skip_special_tokens=False)
    assert semgrad["token_entropies"] == pytest.approx(offline.token_entropies, rel=TOKEN_REL, abs=TOKEN_ABS)
    assert semgrad["token_logprobs"] == pytest.approx(offline.token_logprobs, rel=TOKEN_REL, abs=TOKEN_ABS)


# -- through the API -----------------------------------------------------------------------------------------


def test_tokens_field_adds_texts_entropies_and_logprobs_equal_to_the_offline_scorer(client, default_scorer) -> None:
    messages = ask("Who wrote Hamlet? Answer in one sentence.")
    prompt_ids = default_scorer.prompt_ids(messages)
    for max_tokens in (64, 5):  # ended on the stop token, and cut at the limit
        response = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True, "semgrad": {"tokens": True}},
        )
        (choice,) = response.choices
        semgrad, ids = choice.model_extra["semgrad"], choice.model_extra["token_ids"]
        assert semgrad["stop_token"] == (choice.finish_reason == "stop") and len(semgrad["token_texts"]) == len(ids)
        assert_tokens_equal_offline(semgrad, default_scorer, prompt_ids, ids)
        assert "".join(semgrad["token_texts"]).removesuffix("<|im_end|>") == choice.message.content
    # streamed: the final chunk carries the same data
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"semgrad": {"tokens": True}},
    )
    (streamed,) = [c.model_extra["semgrad"] for chunk in stream for c in chunk.choices if c.model_extra.get("semgrad")]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=64, temperature=0, extra_body={"semgrad": {"tokens": True}}
    )
    expected = plain.choices[0].model_extra["semgrad"]
    assert streamed["token_texts"] == expected["token_texts"]
    assert streamed["token_logprobs"] == pytest.approx(expected["token_logprobs"], rel=TOKEN_REL, abs=TOKEN_ABS)
    # asked for nothing, or for something unknown
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"semgrad": {}})
    assert not set(TOKEN_FIELDS) & set(response.choices[0].model_extra["semgrad"])
    with pytest.raises(openai.BadRequestError, match="unknown option 'claimz'"):
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, extra_body={"semgrad": {"claimz": True}}
        )


def test_recent_answers_are_the_answers_the_api_returned(client, base_url, default_scorer) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=ask(FLAGGED_QUESTION),
        max_tokens=FLAGGED_MAX_TOKENS,
        temperature=0,
        extra_body={"semgrad": {"tokens": True}},
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Name a planet."), max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    completion = client.completions.create(
        model=MODEL,
        prompt=default_scorer.tokenizer.apply_chat_template(
            ask("Name a color."), add_generation_prompt=True, tokenize=False
        ),
        max_tokens=6,
        temperature=0,
    )

    answers = recent(base_url)["answers"]
    assert [e["seq"] for e in answers] == sorted((e["seq"] for e in answers), reverse=True)  # newest first
    by_id = {e["completion_id"]: e for e in answers}
    newest = [by_id[completion.id], by_id[chunks[0].id], by_id[response.id]]
    assert newest[0]["seq"] > newest[1]["seq"] > newest[2]["seq"]
    flagged = newest[2]
    assert flagged["question"] == FLAGGED_QUESTION and flagged["answer"] == response.choices[0].message.content
    assert flagged["semgrad"] == without_tokens(
        response.choices[0].model_extra["semgrad"]
    )  # the same object, less the tokens
    assert (
        flagged["semgrad"]["flagged"] is True and flagged["finish_reason"] == "length" and flagged["endpoint"] == "chat"
    )
    streamed = newest[1]
    assert streamed["answer"] == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        streamed["semgrad"]
        == [
            c.choices[0].model_extra["semgrad"] for c in chunks if c.choices and c.choices[0].model_extra.get("semgrad")
        ][0]
    )
    assert newest[0]["endpoint"] == "completions" and newest[0]["answer"] == completion.choices[0].text
    assert newest[0]["question"].endswith("Name a color.<|im_end|>\n<|im_start|>assistant\n")

    only_flagged = recent(base_url, flagged=1)["answers"]
    assert only_flagged and all(e["semgrad"]["flagged"] is True for e in only_flagged)
    assert [e["seq"] for e in only_flagged] == [
        e["seq"] for e in recent(base_url)["answers"] if e["semgrad"].get("flagged") is True
    ]
    assert len(recent(base_url, limit=2)["answers"]) == 2
    assert httpx.get(f"{base_url}/v1/semgrad/recent", params={"flagged": "maybe"}, timeout=30).status_code == 400
    unscored = client.chat.completions.create(
        model=MODEL, messages=ask("Unscored."), max_tokens=2, extra_body={"semgrad": False}
    )
    assert unscored.id not in [e["completion_id"] for e in recent(base_url)["answers"]]


def test_info_describes_the_profile(base_url, default_scorer) -> None:
    info = httpx.get(f"{base_url}/v1/semgrad/info", timeout=30).json()
    profile = default_scorer.profile
    assert info["t_star"] == {"token": profile.t_star.token, "offset": profile.t_star.offset}
    assert info["band"] == [default_scorer.band.start, default_scorer.band.stop - 1]
    assert info["threshold"] == profile.threshold and info["score"] == profile.score
    assert info["request_options"] == ["tokens", "claims"] and info["recent_capacity"] == 200
    page = httpx.get(f"{base_url}/semgrad", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(f"{base_url}/semgrad/semgrad.js", timeout=30).headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{base_url}/semgrad/nothing.js", timeout=30).status_code == 404


# -- in a browser ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail(
            "the page test needs Debian's chromium and chromium-driver: run scripts/bootstrap.sh as root, or apt-get "
            "install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(semgrad_\w+) (\S+)$", text, re.M)}


def screenshot(driver, width: int, path: Path, focus: Any = None) -> None:
    """The whole page at ``width`` CSS pixels (a phone's viewport below 500 px), with ``focus`` focused."""
    height = 900
    for _ in range(4):  # the viewport as tall as the page (the recent panel's height follows the viewport's)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500},
        )
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        needed = driver.execute_script("return document.documentElement.scrollHeight")
        if needed == height:
            break
        height = needed
    if focus is not None:
        driver.execute_script("arguments[0].blur(); arguments[0].focus({preventScroll: true})", focus)
        time.sleep(0.2)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width, "the page scrolls sideways"
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))


def test_page_in_a_browser(browser, client, base_url, default_scorer) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser

    def by_css(css: str, root=None) -> list:
        return (root or driver).find_elements(By.CSS_SELECTOR, css)

    def click(element) -> None:  # in the middle of the viewport, clear of the sticky question form
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def set_options(max_tokens: int) -> None:
        click(driver.find_element(By.CSS_SELECTOR, "#options summary"))
        field = driver.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys(str(max_tokens))
        keep = driver.find_element(By.ID, "keep-context")
        if keep.is_selected():  # each question alone, as the API calls below ask it
            click(keep)
        click(driver.find_element(By.CSS_SELECTOR, "#options summary"))

    def ask_on_page(text: str) -> tuple[Any, dict[str, Any]]:
        """Type the question, press Enter, wait for the streamed answer and its scores; the card and the
        server's record of that answer (what the API returned for it)."""
        before = len(by_css(".answer"))
        question = driver.find_element(By.ID, "question")
        click(question)
        question.send_keys(text)
        question.send_keys(Keys.ENTER)
        card = wait_for(lambda: by_css(".answer")[before:], 30, "the answer card")[0]
        wait_for(
            lambda: card.get_attribute("data-state") != "streaming",
            ANSWER_TIMEOUT_S,
            "the streamed answer and its scores",
        )
        assert card.get_attribute("data-state") == "done", card.text
        entry = entry_of(base_url, card.get_attribute("data-completion-id"))
        answer = card.find_element(By.CSS_SELECTOR, ".answer-text").get_attribute("textContent")
        assert entry["question"] == text and entry["answer"] == answer and answer
        check_verdict(card, entry["semgrad"])
        return card, entry

    def check_verdict(card, sg: dict[str, Any]) -> None:
        """The badge, the bar and its number show the answer's scores."""
        assert card.find_element(By.CSS_SELECTOR, ".verdict .badge").text == (
            "Flagged" if sg["flagged"] else "Not flagged"
        )
        assert card.get_attribute("data-flag") == str(sg["flagged"]).lower()
        meter = card.find_element(By.CSS_SELECTOR, ".meter")
        number = card.find_element(By.CSS_SELECTOR, ".meter-number").text
        if sg.get("confidence") is not None:
            assert (
                float(meter.get_attribute("aria-valuenow")) == sg["confidence"]
                and number == f"{sg['confidence'] * 100:.0f}%"
            )
        else:  # the score relative to the threshold, labelled as not a probability
            ratio = sg["score"] / sg["threshold"]
            assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(ratio, rel=1e-12)
            assert number == f"{ratio:.2f}× threshold" and meter.get_attribute("data-over") == str(ratio > 1).lower()
            assert "not a probability" in card.find_element(By.CSS_SELECTOR, ".meter-caption").text

    driver.get(f"{base_url}/semgrad")
    wait_for(lambda: driver.execute_script("return document.body.dataset.loaded === 'true'"), 60, "the page to load")
    assert MODEL in driver.find_element(By.ID, "model").text
    click(driver.find_element(By.ID, "question"))  # focus order: the question box, then Send
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.switch_to.active_element.get_attribute("id") == "send"

    # an answer cut after one token: flagged (5x the threshold here)
    set_options(FLAGGED_MAX_TOKENS)
    flagged_card, flagged_entry = ask_on_page(FLAGGED_QUESTION)
    assert flagged_entry["semgrad"]["flagged"] is True
    # a one-sentence answer, not flagged
    set_options(128)
    card, entry = ask_on_page(PAGE_QUESTION)
    sg, answer = entry["semgrad"], entry["answer"]
    badge = card.find_element(By.CSS_SELECTOR, ".verdict .badge").text
    buttons = {b.text: b for b in by_css(".tools button", card)}
    assert set(buttons) == {"Token heat", "Scores & profile"} | ({"Claims"} if sg.get("claims") else set())

    # raw scores and profile, one click away
    click(buttons["Scores & profile"])
    cells = {
        td.find_element(By.XPATH, "preceding-sibling::th").text: float(td.get_attribute("data-value"))
        for td in by_css(".scores td[data-value]", card)
    }
    for label, key in (
        ("SemGrad", "semgrad"),
        ("ParaGrad", "paragrad"),
        ("HybridGrad", "hybridgrad"),
        ("Mean entropy (nats)", "mean_entropy"),
        ("Threshold", "threshold"),
    ):
        assert cells[label] == sg[key], label
    profile_text = card.find_element(By.CSS_SELECTOR, ".panel.scores").text
    assert (
        "last <|im_start|> in the prompt" in profile_text
        and f"{default_scorer.band.start}–{default_scorer.band.stop - 1}" in profile_text
    )

    # token heat: the same greedy answer through the API, with its token ids, for the reference values
    replay = client.chat.completions.create(
        model=MODEL,
        messages=ask(PAGE_QUESTION),
        max_tokens=128,
        temperature=0,
        extra_body={"return_token_ids": True, "semgrad": {"tokens": True}},
    )
    assert replay.choices[0].message.content == answer
    api = replay.choices[0].model_extra["semgrad"]
    click(buttons["Token heat"])
    tokens = by_css(".heat-tokens .tok", card)
    data = [
        json.loads(driver.execute_script("return JSON.stringify(Object.assign({}, arguments[0].dataset))", t))
        for t in tokens
    ]
    texts = [d["text"] for d in data]
    entropies, logprobs = [float(d["entropy"]) for d in data], [float(d["logprob"]) for d in data]
    assert texts == api["token_texts"] and "".join(texts) == answer + ("<|im_end|>" if sg["stop_token"] else "")
    assert entropies == pytest.approx(api["token_entropies"], rel=TOKEN_REL, abs=TOKEN_ABS)
    assert logprobs == pytest.approx(api["token_logprobs"], rel=TOKEN_REL, abs=TOKEN_ABS)
    assert_tokens_equal_offline(
        {"token_texts": texts, "token_entropies": entropies, "token_logprobs": logprobs},
        default_scorer,
        default_scorer.prompt_ids(ask(PAGE_QUESTION)),
        replay.choices[0].model_extra["token_ids"],
    )
    tooltip = driver.find_element(By.ID, "tooltip")
    hottest = max(range(len(tokens)), key=lambda i: entropies[i])
    ActionChains(driver).move_to_element(tokens[hottest]).perform()
    wait_for(tooltip.is_displayed, 5, "the token tooltip")
    assert (
        f"log p = {logprobs[hottest]:.4f}" in tooltip.text
        and f"entropy = {entropies[hottest]:.4f} nats" in tooltip.text
    )
    assert json.dumps(texts[hottest]) in tooltip.text
    click(tokens[0])  # the arrow keys move along the tokens, the tooltip follows
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    assert driver.switch_to.active_element.get_attribute("data-index") == "1"
    assert f"log p = {logprobs[1]:.4f}" in tooltip.text and f"entropy = {entropies[1]:.4f} nats" in tooltip.text

    # recent answers: this answer on top, then the flagged filter
    items = wait_for(
        lambda: by_css(f'#recent-list li[data-completion-id="{entry["completion_id"]}"]'),
        30,
        "the answer in the recent panel",
    )
    assert items[0].find_element(By.CSS_SELECTOR, ".q").text == PAGE_QUESTION
    assert items[0].find_element(By.CSS_SELECTOR, ".badge").text == badge
    click(driver.find_element(By.ID, "refresh"))  # the replay above came after the page's last refresh
    newest = recent(base_url)["answers"][0]["completion_id"]
    wait_for(
        lambda: by_css("#recent-list li")[0].get_attribute("data-completion-id") == newest,
        30,
        "the newest answer on top",
    )
    click(driver.find_element(By.ID, "flagged-only"))
    wait_for(
        lambda: driver.find_element(By.ID, "recent-list").get_attribute("data-filter") == "flagged",
        30,
        "the flagged filter",
    )
    if driver.find_element(By.ID, "recent-more").is_displayed():
        click(driver.find_element(By.ID, "recent-more"))
        wait_for(lambda: not driver.find_element(By.ID, "recent-more").is_displayed(), 30, "all flagged answers")

    def flagged_shown() -> list[str] | None:  # the page's list is the API's (again after a refresh if it changed since)
        shown = [li.get_attribute("data-completion-id") for li in by_css("#recent-list li")]
        if shown == [e["completion_id"] for e in recent(base_url, flagged=1, limit=50)["answers"]]:
            return shown
        click(driver.find_element(By.ID, "refresh"))
        return None

    shown = wait_for(flagged_shown, 30, "the flagged answers the API lists")
    assert flagged_entry["completion_id"] in shown and entry["completion_id"] not in shown
    assert all(b.text == "Flagged" for b in by_css("#recent-list .badge"))
    click(driver.find_element(By.ID, "flagged-only"))
    wait_for(
        lambda: driver.find_element(By.ID, "recent-list").get_attribute("data-filter") == "all",
        30,
        "all recent answers",
    )

    # the counters are /metrics'
    def counters_match() -> bool:
        counts = metrics(base_url)
        names = {
            "c-scored": "semgrad_answers_scored_total",
            "c-flagged": "semgrad_answers_flagged_total",
            "c-errors": "semgrad_scoring_errors_total",
        }
        if all(driver.find_element(By.ID, i).get_attribute("data-value") == f"{counts[n]:g}" for i, n in names.items()):
            return True
        click(driver.find_element(By.ID, "refresh"))
        time.sleep(0.5)
        return False

    wait_for(counters_match, 30, "the counters of /metrics")
    assert driver.find_element(By.ID, "c-latency").text.startswith("mean ")

    # screenshots: the answers, one with its token heat and scores open and a token's tooltip
    for width in (1280, 390):
        screenshot(driver, width, RESULTS / f"page_{width}.png", focus=tokens[hottest])
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # confidence and claims, which this server does not compute yet: rendered from a given semgrad object
    synthetic = {
        **without_tokens(sg),
        "flagged": True,
        "confidence": 0.31,
        "claims": [
            {
                "text": "Herman Melville wrote Moby-Dick.",
                "token_start": 0,
                "token_end": 8,
                "semgrad": 3e-5,
                "paragrad": 1e-5,
                "hybridgrad": 2e-5,
                "confidence": 0.86,
                "flagged": False,
            },
            {
                "text": "It came out in 1852.",
                "token_start": 8,
                "token_end": 15,
                "semgrad": 2e-4,
                "paragrad": 1e-4,
                "hybridgrad": 1.5e-4,
                "confidence": 0.12,
                "flagged": True,
            },
        ],
    }
    card_id = driver.execute_script(
        "return window.semgradPage.showAnswer(arguments[0], arguments[1], arguments[2])",
        "(synthetic)",
        "Herman Melville wrote Moby-Dick. It came out in 1852.",
        synthetic,
    )
    card = driver.find_element(By.ID, card_id)
    assert card.find_element(By.CSS_SELECTOR, ".badge").text == "Flagged"
    meter = card.find_element(By.CSS_SELECTOR, ".meter")
    assert (
        meter.get_attribute("aria-valuenow") == "0.31"
        and card.find_element(By.CSS_SELECTOR, ".meter-number").text == "31%"
    )
    assert "probability that the answer is correct" in card.find_element(By.CSS_SELECTOR, ".meter-caption").text
    click([b for b in by_css(".tools button", card) if b.text == "Claims"][0])
    claims = by_css(".claim", card)
    assert [c.text for c in claims] == [c["text"] for c in synthetic["claims"]]
    assert claims[0].value_of_css_property("background-color") != claims[1].value_of_css_property("background-color")
    driver.execute_script("arguments[0].focus()", claims[1])
    assert "confidence 12.0%" in tooltip.text and "flagged" in tooltip.text

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
