// lmforge web UI: chat (streamed), the reply's tokens, attention maps, the tokenizer. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, info: null, messages: [], lastTokens: [], controller: null };

// ---- talking to the server ------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

// Server-Sent Events from a POST: yields each `data:` payload (parsed JSON) until [DONE]
async function* sse(path, body, signal) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || r.statusText);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, at);
      buf = buf.slice(at + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        const obj = JSON.parse(payload);
        if (obj.error) throw new Error(obj.error.message);
        yield obj;
      }
    }
  }
}

function showError(msg) {
  $("error").textContent = msg || "";
  $("error").hidden = !msg;
}

// ---- tabs ---------------------------------------------------------------------------------------------------
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === b));
    const id = "view-" + b.dataset.view;
    document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === id));
  });
}

// ---- chat ---------------------------------------------------------------------------------------------------
function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function samplingBody() {
  const body = { model: state.model, temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
                 min_p: num("min_p"), max_tokens: num("max_tokens"), logprobs: true, top_logprobs: 5 };
  const seed = num("seed");
  if (seed !== null) body.seed = seed;
  return body;
}

function apiMessages() {
  const system = $("system").value.trim();
  const msgs = state.messages.map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...msgs] : msgs;
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  for (const m of state.messages) {
    const div = document.createElement("div");
    div.className = "msg " + m.role;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    const text = document.createElement("span");
    text.className = "content";
    text.textContent = m.content;
    div.append(role, text);
    if (m.finish) {
      const f = document.createElement("span");
      f.className = "finish";
      f.textContent = "[" + m.finish + "]";
      div.append(f);
    }
    if (m.sources && m.sources.length) div.append(sourcesList(m.sources));
    box.append(div);
  }
  box.scrollTop = box.scrollHeight;
}

function sourcesList(sources) {     // under an answer: [n] source, location; the passage itself on hover
  const ol = document.createElement("ol");
  ol.className = "sources";
  for (const s of sources) {
    const li = document.createElement("li");
    li.textContent = "[" + s.n + "] " + s.source + ", " + s.location;
    li.title = s.text;
    ol.append(li);
  }
  return ol;
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  showError("");
  state.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  const reply = { role: "assistant", content: "", finish: null, tokens: [] };
  const body = Object.assign(samplingBody(), { messages: apiMessages(), stream: true });
  if (state.info && state.info.rag && $("rag").checked) body.rag = { k: num("rag_k") || 4 };
  state.messages.push(reply);
  renderMessages();
  const box = $("messages");
  const shown = box.lastChild.querySelector(".content");   // the reply grows in place (no re-render per token)
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    for await (const chunk of sse("/v1/chat/completions", body, state.controller.signal)) {
      const c = chunk.choices && chunk.choices[0];
      if (chunk.sources) reply.sources = chunk.sources;   // retrieval: the passages [n] of the answer
      if (!c) continue;
      if (c.delta && c.delta.content) reply.content += c.delta.content;
      if (c.logprobs && c.logprobs.content) reply.tokens.push(...c.logprobs.content);
      if (c.finish_reason) reply.finish = c.finish_reason;
      shown.textContent = reply.content;
      box.scrollTop = box.scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") reply.finish = "stopped";
    else {
      showError(e.message);
      if (!reply.content) state.messages.splice(-2, 2);   // nothing came back: take the question back
    }
  }
  state.controller = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  state.lastTokens = reply.tokens;
  renderMessages();
  renderTokens();
}

$("chat-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.messages = []; renderMessages(); });
$("export").addEventListener("click", async () => {
  const json = JSON.stringify(apiMessages(), null, 2);
  $("export-text").value = json;
  try { await navigator.clipboard.writeText(json); } catch (e) { /* the text box holds it anyway */ }
});

// ---- tokens of the last reply -----------------------------------------------------------------------------
function probColour(p) {           // red (0) -> yellow -> green (1)
  return "hsl(" + Math.round(120 * p) + ", 75%, 78%)";
}

function reshaped(top, T) {        // softmax(logprob / T) over the alternatives shown
  const z = top.map((t) => t.logprob / T);
  const m = Math.max(...z);
  const e = z.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function renderTokens() {
  const view = $("token-view");
  view.innerHTML = "";
  if (!state.lastTokens.length) {
    view.innerHTML = "<em>Chat first: the reply's tokens appear here.</em>";
    return;
  }
  state.lastTokens.forEach((t, i) => {
    const span = document.createElement("span");
    const p = Math.exp(t.logprob);
    span.className = "tok";
    span.textContent = t.token;
    span.dataset.index = i;
    span.dataset.p = p.toFixed(4);
    span.style.background = probColour(p);
    span.addEventListener("mouseenter", (e) => showTip(e, t));
    span.addEventListener("mouseleave", () => { $("tip").hidden = true; });
    view.append(span);
  });
}

function showTip(e, t) {
  const T = Number($("token-temp").value);
  const probs = reshaped(t.top_logprobs, T);
  const rows = t.top_logprobs.map((a, i) =>
    "<tr><td>" + escapeHtml(JSON.stringify(a.token)) + "</td><td class='p'>" + Math.exp(a.logprob).toFixed(4) +
    "</td><td class='pT'>" + probs[i].toFixed(4) + "</td></tr>").join("");
  const tip = $("tip");
  tip.innerHTML = "<div>" + escapeHtml(JSON.stringify(t.token)) + " p=" + Math.exp(t.logprob).toFixed(4) +
    "</div><table><tr><th>token</th><th>p</th><th>p at T=" + T.toFixed(1) + "</th></tr>" + rows + "</table>";
  tip.style.left = (e.clientX + 12) + "px";
  tip.style.top = (e.clientY + 12) + "px";
  tip.hidden = false;
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

$("token-temp").addEventListener("input", () => {
  $("token-temp-value").textContent = Number($("token-temp").value).toFixed(1);
});

// ---- attention --------------------------------------------------------------------------------------------
async function showAttention() {
  const source = document.querySelector("input[name=att-source]:checked").value;
  const body = { layer: Number($("layer").value), head: Number($("head").value) };
  if (source === "chat" && state.messages.length) body.messages = apiMessages();
  else body.text = $("att-text").value;
  const view = $("att-view");
  try {
    const a = await api("/v1/lmforge/attention", body);
    const table = document.createElement("table");
    const head = document.createElement("thead");
    head.innerHTML = "<tr><th></th>" + a.tokens.map((t) => "<th>" + escapeHtml(t) + "</th>").join("") + "</tr>";
    const tbody = document.createElement("tbody");
    a.attention.forEach((row, i) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.textContent = a.tokens[i];
      tr.append(th);
      row.forEach((w, j) => {
        const td = document.createElement("td");
        td.dataset.w = w;
        td.title = a.tokens[i] + " → " + a.tokens[j] + ": " + w.toFixed(4);
        td.style.background = "rgba(0, 105, 92, " + Math.sqrt(w).toFixed(3) + ")";  // sqrt: small weights show
        tr.append(td);
      });
      tbody.append(tr);
    });
    table.append(head, tbody);
    view.innerHTML = "";
    view.append(table);
  } catch (e) {
    view.innerHTML = "";
    view.textContent = "error: " + e.message;
  }
}

$("att-show").addEventListener("click", showAttention);

// ---- tokenizer --------------------------------------------------------------------------------------------
const SAMPLES = [
  ["English", "The quick brown fox jumps over the lazy dog."],
  ["German", "Der schnelle braune Fuchs springt über den faulen Hund."],
  ["French", "Le renard brun rapide saute par-dessus le chien paresseux."],
  ["Spanish", "El rápido zorro marrón salta sobre el perro perezoso."],
  ["Russian", "Быстрая коричневая лиса прыгает через ленивую собаку."],
  ["Greek", "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο."],
  ["Chinese", "敏捷的棕色狐狸跳过了懒狗。"],
  ["Japanese", "素早い茶色の狐がのろまな犬を飛び越える。"],
  ["Arabic", "الثعلب البني السريع يقفز فوق الكلب الكسول."],
  ["Hindi", "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।"],
  ["Python", "def add(a, b):\n    return a + b"],
];

function fmt(x, d) { return x === null || x === undefined ? "–" : x.toFixed(d); }

async function tokenizeText() {
  try {
    const r = await api("/v1/lmforge/tokenize", { text: $("tok-text").value });
    $("tok-stats").innerHTML =
      "<span>tokens <b id='stat-tokens'>" + r.n_tokens + "</b></span>" +
      "<span>bytes <b id='stat-bytes'>" + r.n_bytes + "</b></span>" +
      "<span>words <b id='stat-words'>" + r.n_words + "</b></span>" +
      "<span>tokens / word <b id='stat-tpw'>" + fmt(r.tokens_per_word, 2) + "</b></span>" +
      "<span>bytes / token <b id='stat-bpt'>" + fmt(r.bytes_per_token, 2) + "</b></span>";
    const view = $("tok-view");
    view.innerHTML = "";
    for (const t of r.tokens) {
      const s = document.createElement("span");
      s.className = "piece";
      s.textContent = t.text;
      s.dataset.id = t.id;
      s.title = "id " + t.id + ", " + t.bytes + " byte" + (t.bytes === 1 ? "" : "s");
      view.append(s);
    }
  } catch (e) {
    $("tok-stats").textContent = "error: " + e.message;
  }
}

async function compareLanguages() {
  const body = $("tok-table").querySelector("tbody");
  body.innerHTML = "";
  for (const [lang, text] of SAMPLES) {
    const r = await api("/v1/lmforge/tokenize", { text });
    const tr = document.createElement("tr");
    tr.dataset.lang = lang;
    for (const v of [lang, text, r.n_tokens, r.n_bytes, r.n_words, fmt(r.tokens_per_word, 2),
                     fmt(r.bytes_per_token, 2)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
}

$("tok-go").addEventListener("click", tokenizeText);
$("tok-compare").addEventListener("click", compareLanguages);

// ---- start ------------------------------------------------------------------------------------------------
async function start() {
  try {
    state.info = await api("/v1/lmforge/info");
    state.model = state.info.model;
    $("model-name").textContent = state.model + " (" + state.info.context + " tokens of context)";
    const fill = (sel, n) => {
      $(sel).innerHTML = [...Array(n).keys()].map((i) => "<option>" + i + "</option>").join("");
    };
    fill("layer", state.info.n_layer);
    fill("head", state.info.n_head);
    $("rag-box").hidden = $("rag-k-box").hidden = !state.info.rag;
    showError("");
    document.body.dataset.ready = "1";
  } catch (e) {
    showError("cannot reach the model: " + e.message + " (an API key may be needed)");
  }
}
$("api-key").value = localStorage.getItem("lmforge-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lmforge-api-key", $("api-key").value);
  start();
});
start();
