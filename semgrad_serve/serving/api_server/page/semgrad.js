// SemGrad page: chats with the served model through /v1/chat/completions (streamed) and shows each answer's
// SemGrad verdict. Plain JavaScript, nothing loaded from elsewhere. Reads /v1/models, /v1/semgrad/info,
// /v1/semgrad/recent and /metrics of this same server.
"use strict";

(function () {
  const ENTROPY_SCALE = 4; // nats: tokens at or above it get the hottest colour
  const RATIO_SCALE = 2; // the score/threshold bar runs from 0 to twice the threshold
  const POLL_MS = 5000;
  const RECENT_LIMIT = 50; // fetched
  const RECENT_SHOWN = 10; // shown until "Show N more"
  const SCORE_LABELS = {
    semgrad: "SemGrad", paragrad: "ParaGrad", hybridgrad: "HybridGrad", exgrad: "ExGrad", mean_entropy: "Mean entropy",
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    model: null, info: null, history: [], busy: false, controller: null, cards: 0, recentKey: "", openRecent: new Set(),
    recentAll: false,
  };

  // -- small helpers -----------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const isNum = (x) => typeof x === "number" && Number.isFinite(x);

  function fmt(x) {
    if (!isNum(x)) return x === null || x === undefined ? "–" : String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a < 1e-3 || a >= 1e5 ? x.toExponential(3) : String(Number(x.toPrecision(4)));
  }

  function fmtSeconds(s) {
    if (!isNum(s)) return "–";
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function getJSON(url) {
    const res = await fetch(url, { headers: headers(), cache: "no-store" });
    if (res.status === 401) throw new AuthError();
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.json();
  }

  class AuthError extends Error {
    constructor() { super("This server needs an API key: enter it under Options."); }
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text || "";
    s.classList.toggle("error", Boolean(isError));
    if (isError && text && text.includes("API key")) $("options").open = true;
  }

  // -- the verdict of one answer ------------------------------------------------------------------------

  // What the bar shows: the calibrated confidence where the server gives one; until then the configured
  // score relative to the flag threshold (honestly labelled: it is not a probability).
  function verdictOf(sg) {
    if (!sg || typeof sg !== "object") return { kind: "none" };
    if (sg.error) return { kind: "error", message: String(sg.error) };
    const flagged = sg.flagged === true ? true : sg.flagged === false ? false : null;
    if (isNum(sg.confidence)) {
      return {
        kind: "confidence", flagged, value: sg.confidence, max: 1, fill: Math.min(Math.max(sg.confidence, 0), 1),
        mark: isNum(sg.min_confidence) ? Math.min(Math.max(sg.min_confidence, 0), 1) : null, over: flagged === true,
        number: `${(sg.confidence * 100).toFixed(0)}%`,
        caption: "confidence: estimated probability that the answer is correct",
      };
    }
    const name = state.info && state.info.score ? SCORE_LABELS[state.info.score] || state.info.score : "score";
    if (isNum(sg.score) && isNum(sg.threshold) && sg.threshold > 0) {
      const ratio = sg.score / sg.threshold;
      return {
        kind: "ratio", flagged, value: ratio, max: RATIO_SCALE, fill: Math.min(ratio, RATIO_SCALE) / RATIO_SCALE,
        mark: 1 / RATIO_SCALE, over: ratio > 1, number: `${ratio.toFixed(2)}× threshold`,
        caption: `${name} ÷ flag threshold (not a probability; above 1× is flagged, lower means the model was surer)`,
      };
    }
    return { kind: "score", flagged, number: isNum(sg.score) ? `${name} ${fmt(sg.score)}` : "", caption: "no flag threshold in this profile" };
  }

  function badgeFor(v) {
    if (v.kind === "error") return el("span", { class: "badge error", text: "Not scored" });
    if (v.kind === "none") return el("span", { class: "badge", text: "No score" });
    if (v.flagged === true) return el("span", { class: "badge flagged", text: "Flagged" });
    if (v.flagged === false) return el("span", { class: "badge ok", text: "Not flagged" });
    return el("span", { class: "badge", text: "No threshold" });
  }

  function renderVerdict(box, sg) {
    const v = verdictOf(sg);
    box.replaceChildren(badgeFor(v));
    box.dataset.kind = v.kind;
    if (v.kind === "error") {
      box.append(el("p", { class: "answer-error", text: v.message }));
      return v;
    }
    if (v.kind === "confidence" || v.kind === "ratio") {
      const meter = el("div", {
        class: "meter", role: "meter", "aria-valuemin": 0, "aria-valuemax": v.max, "aria-valuenow": v.value,
        "aria-valuetext": v.number, "aria-label": v.kind === "confidence" ? "Confidence" : "Score relative to the flag threshold",
        dataset: { over: String(v.over), kind: v.kind },
      });
      const fill = el("span", { class: "meter-fill" });
      fill.style.setProperty("width", `${(v.fill * 100).toFixed(2)}%`);
      meter.append(fill);
      if (v.mark !== null) {
        const mark = el("span", { class: "meter-mark", title: "flag threshold" });
        mark.style.setProperty("left", `calc(${(v.mark * 100).toFixed(2)}% - 1px)`);
        meter.append(mark);
      }
      box.append(el("div", { class: "meter-wrap" }, meter, el("span", { class: "meter-number", text: v.number })));
    } else if (v.number) {
      box.append(el("span", { class: "meter-number", text: v.number }));
    }
    if (v.caption) box.append(el("p", { class: "meter-caption", text: v.caption }));
    return v;
  }

  const REUSED_LABELS = { prompt_kv: "prompt keys/values", band_inputs: "band inputs", logits: "logits" };

  function scoresPanel(sg) {
    const rows = [];
    const row = (label, value, raw) =>
      rows.push(el("tr", null, el("th", { scope: "row", text: label }), el("td", { text: value, dataset: raw === undefined ? {} : { value: String(raw) } })));
    for (const key of ["semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy"]) {
      if (isNum(sg[key])) row(SCORE_LABELS[key] + (key === "mean_entropy" ? " (nats)" : ""), fmt(sg[key]), sg[key]);
    }
    const info = state.info || {};
    if (isNum(sg.score)) row(`Flag score (${SCORE_LABELS[info.score] || info.score || "profile's"})`, fmt(sg.score), sg.score);
    row("Threshold", isNum(sg.threshold) ? fmt(sg.threshold) : "none", isNum(sg.threshold) ? sg.threshold : undefined);
    row("Flagged", sg.flagged === true ? "yes" : sg.flagged === false ? "no" : "–");
    if (isNum(sg.confidence)) row("Confidence", `${(sg.confidence * 100).toFixed(1)}%`, sg.confidence);
    if (typeof sg.stop_token === "boolean") row("Stop token scored", sg.stop_token ? "yes (ended on end-of-turn)" : "no (cut or stop string)");
    if (Array.isArray(sg.reused)) row("Reused from vLLM", sg.reused.length ? sg.reused.map((r) => REUSED_LABELS[r] || r).join(", ") : "nothing (recomputed)");
    const scores = el("table", { class: "scores" }, el("caption", { class: "visually-hidden", text: "Raw scores" }), el("tbody", null, ...rows));

    const prof = [];
    const prow = (label, value) => prof.push(el("tr", null, el("th", { scope: "row", text: label }), el("td", { text: value })));
    if (info.profile) prow("Profile", info.profile);
    if (info.t_star) {
      const off = info.t_star.offset ? ` ${info.t_star.offset > 0 ? "+" : "−"} ${Math.abs(info.t_star.offset)}` : "";
      prow("t* rule", `last ${info.t_star.token} in the prompt${off}`);
    }
    if (Array.isArray(info.band)) prow("Band (hidden-state layers)", `${info.band[0]}–${info.band[1]}`);
    if (info.score) prow("Flag score", SCORE_LABELS[info.score] || info.score);
    if (info.family) prow("Model family", info.family);
    if (info.dtype) prow("Scoring dtype", info.dtype);
    const profile = el("table", { class: "scores" }, el("caption", { class: "visually-hidden", text: "Scoring profile" }), el("tbody", null, ...prof));
    return [el("h3", { text: "Scores (higher = less sure)" }), scores, el("h3", { text: "Profile" }), profile];
  }

  // -- token heat and claims ----------------------------------------------------------------------------

  function heatColour(entropy) {
    const t = Math.min(Math.max(entropy / ENTROPY_SCALE, 0), 1);
    return `hsla(22, 95%, 52%, ${(0.06 + 0.84 * t).toFixed(3)})`;
  }

  function confidenceColour(c) {
    const t = Math.min(Math.max(c, 0), 1);
    return `hsla(${Math.round(4 + 136 * t)}, 75%, 50%, 0.38)`;
  }

  function tokenTip(node) {
    const d = node.dataset;
    const lp = Number(d.logprob), ent = Number(d.entropy);
    return `token ${Number(d.index) + 1}: ${JSON.stringify(d.text)}\nlog p = ${lp.toFixed(4)}  (p = ${Math.exp(lp).toFixed(4)})\nentropy = ${ent.toFixed(4)} nats`;
  }

  function heatPanel(sg) {
    const texts = sg.token_texts || [], ents = sg.token_entropies || [], lps = sg.token_logprobs || [];
    const n = Math.min(texts.length, ents.length, lps.length);
    if (!n) return [el("p", { class: "note", text: "No per-token data in this answer's scores." })];
    const wrap = el("p", { class: "heat-tokens", role: "group", "aria-label": "Answer tokens coloured by entropy; arrow keys move between them" });
    for (let i = 0; i < n; i++) {
      const last = i === n - 1 && sg.stop_token === true;
      const tok = el("span", {
        class: "tok" + (texts[i] === "" ? " tok-empty" : "") + (last ? " tok-stop" : ""),
        tabindex: i === 0 ? 0 : -1,
        dataset: { index: String(i), text: texts[i], entropy: String(ents[i]), logprob: String(lps[i]) },
        text: texts[i],
      });
      tok.style.setProperty("background-color", heatColour(ents[i]));
      wrap.append(tok);
    }
    wrap.addEventListener("keydown", (event) => {
      const cur = event.target.closest(".tok");
      if (!cur) return;
      const all = wrap.querySelectorAll(".tok");
      let next = null;
      const i = Number(cur.dataset.index);
      if (event.key === "ArrowRight" || event.key === "ArrowDown") next = all[Math.min(i + 1, all.length - 1)];
      else if (event.key === "ArrowLeft" || event.key === "ArrowUp") next = all[Math.max(i - 1, 0)];
      else if (event.key === "Home") next = all[0];
      else if (event.key === "End") next = all[all.length - 1];
      else if (event.key === "Escape") hideTip();
      if (next) {
        event.preventDefault();
        cur.tabIndex = -1;
        next.tabIndex = 0;
        next.focus();
      }
    });
    const legend = el("p", { class: "legend" },
      el("span", { text: "entropy 0" }), el("span", { class: "legend-bar", "aria-hidden": "true" }),
      el("span", { text: `≥ ${ENTROPY_SCALE} nats` }),
      el("span", { text: `${n} tokens scored; hover, tap or focus one for its log-probability and entropy` }));
    return [el("h3", { text: "Token heat" }), legend, wrap];
  }

  function claimTip(node) {
    const d = node.dataset;
    const parts = [];
    if (d.confidence) parts.push(`confidence ${(Number(d.confidence) * 100).toFixed(1)}%`);
    if (d.flagged) parts.push(d.flagged === "true" ? "flagged" : "not flagged");
    for (const key of ["semgrad", "paragrad", "hybridgrad"]) if (d[key]) parts.push(`${SCORE_LABELS[key]} ${fmt(Number(d[key]))}`);
    return `claim ${Number(d.index) + 1}\n${parts.join("\n")}`;
  }

  function claimSpan(claim, i, text) {
    const data = { index: String(i) };
    if (isNum(claim.confidence)) data.confidence = String(claim.confidence);
    if (typeof claim.flagged === "boolean") data.flagged = String(claim.flagged);
    for (const key of ["semgrad", "paragrad", "hybridgrad"]) if (isNum(claim[key])) data[key] = String(claim[key]);
    const span = el("span", { class: "claim", tabindex: 0, dataset: data, text });
    const tint = isNum(claim.confidence) ? confidenceColour(claim.confidence)
      : claim.flagged === true ? confidenceColour(0) : claim.flagged === false ? confidenceColour(1) : null;
    if (tint) span.style.setProperty("background-color", tint);
    return span;
  }

  // The answer's text with each claim's sentence (in order) tinted by its confidence; the rest as it came.
  function tintAnswer(node, answer, claims) {
    const parts = [];
    let at = 0;
    claims.forEach((claim, i) => {
      const text = String(claim.text || "");
      const found = text && at >= 0 ? answer.indexOf(text, at) : -1;
      if (found < 0) {
        at = -1;
        return;
      }
      if (found > at) parts.push(answer.slice(at, found));
      parts.push(claimSpan(claim, i, text));
      at = found + text.length;
    });
    if (at < 0) return false;
    parts.push(answer.slice(at));
    node.replaceChildren(...parts);
    return true;
  }

  function claimsPanel(claims) {
    const wrap = el("p", { class: "claim-text" });
    claims.forEach((claim, i) => wrap.append(claimSpan(claim, i, String(claim.text || "")), " "));
    const legend = el("p", { class: "legend" }, el("span", { text: "confidence 0" }),
      el("span", { class: "legend-bar confidence", "aria-hidden": "true" }), el("span", { text: "1 · focus a sentence for its scores" }));
    return [el("h3", { text: `Claims (${claims.length})` }), legend, wrap];
  }

  // -- tooltip ------------------------------------------------------------------------------------------

  let tipOwner = null;

  function showTip(node) {
    const tip = $("tooltip");
    tip.textContent = node.classList.contains("tok") ? tokenTip(node) : claimTip(node);
    tip.hidden = false;
    tipOwner = node;
    node.setAttribute("aria-describedby", "tooltip");
    const r = node.getBoundingClientRect();
    const w = tip.offsetWidth, h = tip.offsetHeight;
    const left = Math.min(Math.max(8, r.left), window.innerWidth - w - 8);
    const below = r.bottom + 6;
    const top = below + h > window.innerHeight - 4 ? Math.max(4, r.top - h - 6) : below;
    tip.style.setProperty("left", `${left}px`);
    tip.style.setProperty("top", `${top}px`);
  }

  function hideTip() {
    if (tipOwner) tipOwner.removeAttribute("aria-describedby");
    tipOwner = null;
    $("tooltip").hidden = true;
  }

  function tipTarget(event) {
    return event.target instanceof Element ? event.target.closest(".tok, .claim") : null;
  }

  document.addEventListener("mouseover", (e) => { const t = tipTarget(e); if (t) showTip(t); });
  document.addEventListener("mouseout", (e) => { if (tipTarget(e) && tipTarget(e) === tipOwner) hideTip(); });
  document.addEventListener("focusin", (e) => { const t = tipTarget(e); if (t) showTip(t); else if (tipOwner) hideTip(); });
  document.addEventListener("focusout", (e) => { if (tipTarget(e) === tipOwner) hideTip(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && tipOwner) hideTip(); });
  window.addEventListener("scroll", () => { if (tipOwner && document.activeElement !== tipOwner) hideTip(); }, { passive: true });

  // -- answer cards -------------------------------------------------------------------------------------

  function toggleButton(label, panel) {
    const button = el("button", { type: "button", class: "tool", "aria-expanded": "false", "aria-controls": panel.id, text: label });
    button.addEventListener("click", () => {
      const open = button.getAttribute("aria-expanded") !== "true";
      button.setAttribute("aria-expanded", String(open));
      panel.hidden = !open;
      if (!open) hideTip();
    });
    return button;
  }

  function addTurn(question) {
    $("intro").hidden = true;
    const id = ++state.cards;
    const conv = $("conversation");
    conv.append(el("li", { class: "turn user" }, el("div", { class: "bubble", text: question })));
    const text = el("p", { class: "answer-text" });
    const verdict = el("div", { class: "verdict", "aria-live": "polite" }, el("span", { class: "badge", text: "Answering…" }));
    const tools = el("div", { class: "tools", hidden: true });
    const card = el("article", { class: "answer", id: `answer-${id}`, "aria-label": `Answer ${id}`, dataset: { state: "streaming" } }, text, verdict, tools);
    conv.append(el("li", { class: "turn assistant" }, card));
    card.scrollIntoView({ block: "nearest" });
    return { id, card, text, verdict, tools };
  }

  function finishCard(view, sg) {
    const { id, card, verdict, tools } = view;
    const v = renderVerdict(verdict, sg);
    card.dataset.state = v.kind === "error" ? "error" : "done";
    card.dataset.flag = v.flagged === true ? "true" : v.flagged === false ? "false" : "none";
    card.dataset.verdict = v.kind;
    if (!sg || sg.error) return;
    const panels = [];
    if (Array.isArray(sg.token_texts)) panels.push(["Token heat", "heat", heatPanel(sg)]);
    if (Array.isArray(sg.claims) && sg.claims.length) panels.push(["Claims", "claims", claimsPanel(sg.claims)]);
    panels.push(["Scores & profile", "scores", scoresPanel(sg)]);
    const buttons = [];
    for (const [label, name, content] of panels) {
      const panel = el("div", { class: `panel ${name}`, id: `${name}-${id}`, hidden: true }, ...content);
      buttons.push(toggleButton(label, panel));
      card.append(panel);
    }
    tools.replaceChildren(...buttons);
    tools.hidden = false;
  }

  // -- streaming chat -----------------------------------------------------------------------------------

  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += value;
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data && data !== "[DONE]") onData(JSON.parse(data));
      }
      if (done) return;
    }
  }

  function requestBody(messages) {
    const options = (state.info && state.info.request_options) || [];
    const semgrad = {};
    if (options.includes("tokens")) semgrad.tokens = true;
    if (options.includes("claims")) semgrad.claims = "live"; // each sentence tinted as soon as it is scored
    const body = { messages, stream: true, max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value) || 0 };
    if (state.model) body.model = state.model;
    body.semgrad = Object.keys(semgrad).length ? semgrad : true;
    return body;
  }

  async function errorMessage(res) {
    try {
      const body = await res.json();
      return (body.error && (body.error.message || body.error)) || body.message || body.detail || `HTTP ${res.status}`;
    } catch (e) {
      return `HTTP ${res.status}`;
    }
  }

  async function ask(question) {
    const keep = $("keep-context").checked;
    const messages = (keep ? state.history : []).concat([{ role: "user", content: question }]);
    const view = addTurn(question);
    state.busy = true;
    state.controller = new AbortController();
    $("send").disabled = true;
    $("stop").hidden = false;
    setStatus("Answering…");
    const started = performance.now();
    let answer = "", sg = null, live = [];
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(requestBody(messages)),
        signal: state.controller.signal,
      });
      if (res.status === 401) throw new AuthError();
      if (!res.ok) throw new Error(await errorMessage(res));
      await readEvents(res.body, (chunk) => {
        if (chunk.error || chunk.object === "error") throw new Error(chunk.message || (chunk.error && chunk.error.message) || "the server reported an error");
        if (chunk.id) view.card.dataset.completionId = chunk.id;
        for (const choice of chunk.choices || []) {
          if (choice.index !== 0) continue;
          const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
          const claims = !choice.finish_reason && choice.semgrad && Array.isArray(choice.semgrad.claims) ? choice.semgrad.claims : [];
          if (claims.length) {
            live = live.concat(claims); // live claims: sentences scored while the answer streams
            view.card.dataset.liveClaims = String(live.length);
          }
          if (piece || claims.length) {
            const following = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 320;
            answer += piece;
            if (!live.length || !tintAnswer(view.text, answer, live)) view.text.textContent = answer;
            if (following) view.card.scrollIntoView({ block: "nearest" });
          }
          if (choice.finish_reason) view.card.dataset.finishReason = choice.finish_reason;
          if (choice.finish_reason && choice.semgrad) sg = choice.semgrad;
        }
      });
      if (!answer) view.text.textContent = "(empty answer)";
      else if (sg && Array.isArray(sg.claims)) tintAnswer(view.text, answer, sg.claims);
      finishCard(view, sg);
      if (keep) state.history = messages.concat([{ role: "assistant", content: answer }]);
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      setStatus(sg ? `Answered and scored in ${secs} s.` : `Answered in ${secs} s; the response carried no score.`);
    } catch (err) {
      const stopped = err && err.name === "AbortError";
      view.text.textContent = answer || (stopped ? "(stopped)" : "");
      view.card.dataset.state = stopped ? "stopped" : "error";
      view.verdict.replaceChildren(el("span", { class: "badge", text: stopped ? "Stopped: not scored" : "Failed" }));
      if (!stopped) view.verdict.append(el("p", { class: "answer-error", text: String(err.message || err) }));
      setStatus(stopped ? "Stopped." : String(err.message || err), !stopped);
    } finally {
      state.busy = false;
      state.controller = null;
      $("send").disabled = false;
      $("stop").hidden = true;
      refresh();
    }
  }

  // -- recent answers and counters ----------------------------------------------------------------------

  function recentItem(entry) {
    const sg = entry.semgrad || {};
    const v = verdictOf(sg);
    const details = el("details", { dataset: { seq: String(entry.seq) } },
      el("summary", null,
        el("span", { class: "q", text: entry.question || "(no question)" }),
        el("span", { class: "row" }, badgeFor(v), el("span", { class: "num", text: v.number || "" }),
          el("span", { class: "when", text: new Date(entry.time * 1000).toLocaleTimeString() }))),
      el("div", { class: "recent-body" },
        el("p", { class: "a", text: entry.answer || "(empty)" }),
        v.kind === "error" ? el("p", { class: "answer-error", text: v.message }) : null,
        el("p", { class: "meta", text: [entry.model, entry.endpoint, entry.finish_reason && `finished: ${entry.finish_reason}`,
          isNum(sg.score) ? `score ${fmt(sg.score)}` : null, entry.truncated ? "text cut" : null].filter(Boolean).join(" · ") })));
    details.open = state.openRecent.has(entry.seq);
    details.addEventListener("toggle", () => { if (details.open) state.openRecent.add(entry.seq); else state.openRecent.delete(entry.seq); });
    return el("li", {
      class: "recent-item",
      dataset: { completionId: entry.completion_id || "", index: String(entry.index), flag: String(sg.flagged === true ? true : sg.flagged === false ? false : "none") },
    }, details);
  }

  async function loadRecent() {
    const flaggedOnly = $("flagged-only").checked;
    const data = await getJSON(`/v1/semgrad/recent?limit=${RECENT_LIMIT}${flaggedOnly ? "&flagged=1" : ""}`);
    const key = `${flaggedOnly}|${state.recentAll}|${data.total}|${data.answers.map((a) => a.seq).join(",")}`;
    const list = $("recent-list");
    const answers = state.recentAll ? data.answers : data.answers.slice(0, RECENT_SHOWN);
    if (key !== state.recentKey) {
      state.recentKey = key;
      const focused = document.activeElement && document.activeElement.id === "recent-more";
      list.replaceChildren(...answers.map(recentItem));
      const more = $("recent-more");
      more.hidden = answers.length >= data.answers.length;
      more.textContent = `Show ${data.answers.length - answers.length} more`;
      if (focused && !more.hidden) more.focus();
    }
    list.dataset.filter = flaggedOnly ? "flagged" : "all";
    const shown = answers.length;
    $("recent-note").textContent = data.capacity === 0
      ? "This server keeps no recent answers (serve --recent 0)."
      : shown === 0
        ? (flaggedOnly ? "No flagged answers among the recent ones." : "No answers scored yet.")
        : `Newest first · ${shown} shown${flaggedOnly ? " (flagged only)" : ""} · the server keeps the last ${data.capacity} in memory`;
  }

  function parseMetrics(text) {
    const sums = {}, buckets = [];
    for (const line of text.split("\n")) {
      if (!line.startsWith("semgrad_")) continue;
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
      if (!m) continue;
      const value = Number(m[3]);
      if (!Number.isFinite(value)) continue;
      if (m[1] === "semgrad_scoring_latency_seconds_bucket") {
        const le = /le="([^"]+)"/.exec(m[2] || "");
        if (le) buckets.push([le[1] === "+Inf" ? Infinity : Number(le[1]), value]);
      } else {
        sums[m[1]] = (sums[m[1]] || 0) + value;
      }
    }
    return { sums, buckets };
  }

  function quantileBound(buckets, q) {
    const merged = new Map();
    for (const [le, count] of buckets) merged.set(le, (merged.get(le) || 0) + count);
    const sorted = [...merged.entries()].sort((a, b) => a[0] - b[0]);
    if (!sorted.length) return null;
    const total = sorted[sorted.length - 1][1];
    if (!total) return null;
    for (const [le, count] of sorted) if (count >= q * total) return le;
    return Infinity;
  }

  async function loadCounters() {
    const res = await fetch("/metrics", { cache: "no-store" });
    if (!res.ok) throw new Error(`/metrics: HTTP ${res.status}`);
    const { sums, buckets } = parseMetrics(await res.text());
    const scored = sums.semgrad_answers_scored_total, flagged = sums.semgrad_answers_flagged_total;
    const errors = sums.semgrad_scoring_errors_total;
    $("c-scored").textContent = isNum(scored) ? String(scored) : "–";
    $("c-flagged").textContent = isNum(flagged) ? (scored ? `${flagged} (${Math.round((100 * flagged) / scored)}%)` : String(flagged)) : "–";
    $("c-errors").textContent = isNum(errors) ? String(errors) : "–";
    const count = sums.semgrad_scoring_latency_seconds_count, sum = sums.semgrad_scoring_latency_seconds_sum;
    const p95 = quantileBound(buckets, 0.95);
    $("c-latency").textContent = count
      ? `mean ${fmtSeconds(sum / count)}` + (p95 !== null ? ` · p95 ${p95 === Infinity ? "> 60 s" : "≤ " + fmtSeconds(p95)}` : "")
      : "–";
    for (const [id, value] of [["c-scored", scored], ["c-flagged", flagged], ["c-errors", errors]]) $(id).dataset.value = String(value ?? "");
  }

  let refreshing = null;
  function refresh() {
    // one refresh at a time; a call during one gets a fresh one after it (the filter may have changed)
    if (refreshing) return refreshing.then(() => refresh());
    refreshing = Promise.allSettled([loadRecent(), loadCounters()]).then((results) => {
      refreshing = null;
      const failed = results.find((r) => r.status === "rejected");
      if (failed) {
        const msg = failed.reason instanceof AuthError ? failed.reason.message : `Could not refresh: ${failed.reason.message || failed.reason}`;
        $("recent-note").textContent = msg;
        if (failed.reason instanceof AuthError) setStatus(msg, true);
      }
    });
    return refreshing;
  }

  function poll() {
    if (!document.hidden && !state.busy) refresh();
    setTimeout(poll, POLL_MS);
  }

  // -- start --------------------------------------------------------------------------------------------

  async function loadSetup() {
    try {
      const [models, info] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/semgrad/info")]);
      state.model = models.data && models.data[0] ? models.data[0].id : null;
      state.info = info;
      $("model").textContent = `${state.model || "model"} · profile ${info.profile}`;
      document.body.dataset.ready = "true";
      if ($("status").classList.contains("error")) setStatus(""); // e.g. the API key was missing
    } catch (err) {
      $("model").textContent = "not connected";
      setStatus(err instanceof AuthError ? err.message : `Cannot reach the scoring set-up: ${err.message || err}`, true);
    }
  }

  function start() {
    const stored = sessionStorage.getItem("semgrad-api-key");
    if (stored) $("api-key").value = stored;
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem("semgrad-api-key", $("api-key").value.trim());
      loadSetup().then(refresh);
    });
    $("ask").addEventListener("submit", (event) => {
      event.preventDefault();
      const question = $("question").value.trim();
      if (!question || state.busy) return;
      $("question").value = "";
      ask(question);
    });
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("new-chat").addEventListener("click", () => {
      state.history = [];
      $("conversation").replaceChildren();
      $("intro").hidden = false;
      hideTip();
      setStatus("New conversation.");
      $("question").focus();
    });
    $("flagged-only").addEventListener("change", () => { state.recentKey = ""; state.recentAll = false; refresh(); });
    $("recent-more").addEventListener("click", () => {
      state.recentAll = true;
      refresh().then(() => { const first = $("recent-list").querySelectorAll("summary")[RECENT_SHOWN]; if (first) first.focus(); });
    });
    $("refresh").addEventListener("click", () => refresh());
    loadSetup().then(() => refresh()).then(() => { document.body.dataset.loaded = "true"; });
    setTimeout(poll, POLL_MS);
  }

  // For tests and demos: show an answer with a given "semgrad" object, as if it had been streamed.
  window.semgradPage = {
    showAnswer(question, answer, semgrad) {
      const view = addTurn(question);
      view.text.textContent = answer;
      finishCard(view, semgrad);
      return view.card.id;
    },
    refresh,
  };

  start();
})();
