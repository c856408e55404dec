"""The page at ``/``: one prompt or sentence against several adapters, answers side by side.

Plain HTML + fetch (no build step, no external assets).  Query parameters fill it in and run it
(``/?text=...&adapters=a,b&run=1``; ``key=`` the API key, ``max_tokens=`` for generation), which is how the browser test drives it; when
every answer is in, ``<body data-done="1">``.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastpeft serve</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:80em}
textarea{width:100%;height:4em;font-size:1em}
#adapters label{margin-right:1em;white-space:nowrap}
#results{display:flex;gap:1em;flex-wrap:wrap;margin-top:1em}
.col{flex:1 1 16em;border:1px solid #ccc;border-radius:6px;padding:.5em 1em;min-width:14em}
.col h3{margin:.2em 0;font-size:1em}.task{color:#666;font-size:.85em}
pre{white-space:pre-wrap;word-break:break-word}.err{color:#b00}
</style></head>
<body>
<h1>fastpeft serve</h1>
<p>Try one text against several adapters. Classification adapters return a label (or one tag per word);
causal-LM adapters continue the text (greedy, <input id="max_tokens" type="number" value="32" min="1"
style="width:4em"> tokens).</p>
<div id="adapters">loading adapters…</div>
<p><label>API key (if the server needs one): <input id="key" type="password"></label></p>
<textarea id="text" placeholder="a sentence or a prompt"></textarea>
<p><button id="run">Run</button></p>
<div id="results"></div>
<script>
const params = new URLSearchParams(location.search);
const $ = id => document.getElementById(id);
if (params.get("key")) $("key").value = params.get("key");
if (params.get("text")) $("text").value = params.get("text");
if (params.get("max_tokens")) $("max_tokens").value = params.get("max_tokens");
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
let tasks = {};
async function loadAdapters() {
  const r = await fetch("/v1/adapters", {headers: headers()});
  const box = $("adapters");
  if (!r.ok) { box.textContent = "could not list adapters: " + r.status; return; }
  const wanted = (params.get("adapters") || "").split(",").filter(x => x);
  box.textContent = "";
  for (const a of (await r.json()).data) {
    tasks[a.id] = a.task;
    const l = document.createElement("label");
    const c = document.createElement("input");
    c.type = "checkbox"; c.value = a.id; c.checked = wanted.length ? wanted.includes(a.id) : true;
    l.append(c, " " + a.id + " ");
    const t = document.createElement("span"); t.className = "task"; t.textContent = "(" + a.task + ")";
    l.append(t); box.append(l);
  }
}
function show(col, text, isError) {
  const pre = col.querySelector("pre");
  pre.textContent = text; pre.className = isError ? "result err" : "result";
}
async function runOne(name, text, col) {
  const task = tasks[name];
  let url, body;
  if (task === "causal_lm") {
    url = "/v1/completions";
    body = {model: name, prompt: text, max_tokens: parseInt($("max_tokens").value) || 32, temperature: 0};
  } else {
    url = "/v1/classify"; body = {model: name, input: text};
  }
  try {
    const r = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body)});
    const j = await r.json();
    if (!r.ok) { show(col, j.error ? j.error.message : r.status, true); return; }
    if (task === "causal_lm") show(col, j.choices[0].text);
    else if (task === "token_classification")
      show(col, j.data[0].tokens.map((w, i) => w + "/" + j.data[0].tags[i]).join(" "));
    else {
      const d = j.data[0];
      show(col, d.label + "  (" + (100 * d.scores[d.label]).toFixed(1) + "%)");
    }
  } catch (e) { show(col, String(e), true); }
}
async function run() {
  document.body.dataset.done = "0";
  const text = $("text").value;
  const names = [...document.querySelectorAll("#adapters input:checked")].map(c => c.value);
  const out = $("results"); out.textContent = "";
  const jobs = names.map(name => {
    const col = document.createElement("div"); col.className = "col"; col.id = "out-" + name;
    const h = document.createElement("h3"); h.textContent = name;
    const t = document.createElement("div"); t.className = "task"; t.textContent = tasks[name];
    const pre = document.createElement("pre"); pre.className = "result"; pre.textContent = "…";
    col.append(h, t, pre); out.append(col);
    return runOne(name, text, col);
  });
  await Promise.all(jobs);
  document.body.dataset.done = "1";
}
$("run").addEventListener("click", run);
loadAdapters().then(() => { if (params.get("run") === "1") run(); });
</script>
</body></html>
"""
