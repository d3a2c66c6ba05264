// The nemotron-fast playground: submits through the server's queue API like any client, follows the opt-in step
// stream (GET /queue/{app}/requests/{id}/steps) and draws each block's reveals live; a replay afterwards.
// Plain JS, no build step, no network beyond this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  // the API lives on this origin, under the same path prefix as the page (".../playground")
  const ORIGIN = location.origin + location.pathname.replace(/\/playground\/?$/, "").replace(/\/$/, "");
  let appId = null;
  let image = null; // {url, label}
  let run = null; // the request in flight
  let last = null; // the finished run, for the replay: {events, output}

  // ---- small helpers ---------------------------------------------------------------------------------------
  const setState = (s) => { document.body.dataset.state = s; };
  const say = (text) => { $("status").textContent = text; };
  const showError = (text) => { $("error").textContent = text || ""; $("error").hidden = !text; };
  const fmt = (x, digits) => (Number.isFinite(x) ? x.toFixed(digits) : "–");

  function authHeaders(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Key ${key}`;
    return h;
  }

  // An API error response in words.
  async function describe(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : "";
    if (resp.status === 401) {
      return "401 Unauthorized: this server requires an API key. Type it in the \"API key\" field and run again."
        + (text ? ` (The server said: ${text})` : "");
    }
    if (resp.status === 422 && Array.isArray(detail)) {
      const items = detail.map((e) => {
        const loc = (e.loc || []).filter((p) => p !== "body").join(".") || "input";
        return `${loc}: ${e.msg}`;
      });
      return `The server refused the input (422): ${items.join("; ")}`;
    }
    if (resp.status === 413) return `The request is too large (413): ${text || "choose a smaller image"}`;
    return `The server answered ${resp.status} ${resp.statusText}${text ? `: ${text}` : ""}`;
  }

  // ---- image sources ---------------------------------------------------------------------------------------
  function useImage(url, label) {
    image = { url, label };
    const img = $("preview");
    img.src = url;
    img.alt = `Chosen image: ${label}`;
    img.hidden = false;
    $("image-source").textContent = `Image: ${label}`;
  }

  function readFile(file, label) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${label} is not an image (its type is ${file.type}).`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => { showError(""); $("url").value = ""; useImage(reader.result, label); };
    reader.onerror = () => showError(`Could not read ${label}: ${reader.error}`);
    reader.readAsDataURL(file);
  }

  async function useExample() {
    try {
      const resp = await fetch("playground/example.png");
      if (!resp.ok) { showError(await describe(resp)); return; }
      readFile(await resp.blob(), "the bundled example (example.png)");
    } catch (e) {
      showError(`Could not load the example image: ${e.message}`);
    }
  }

  // ---- the block view --------------------------------------------------------------------------------------
  const newView = () => ({ block: -1, slots: [], answer: "", steps: 0, forwards: 0, revealed: 0, kind: null });

  // Fold one stream event into the view.
  function apply(v, ev) {
    if (ev.type === "output") { v.answer = ev.output; return; }
    if (ev.type !== "step") return;
    if (ev.block !== v.block) { v.block = ev.block; v.slots = new Array(ev.block_length).fill(null); }
    for (const s of v.slots) if (s) s.fresh = false;
    v.forwards = ev.forwards;
    v.kind = ev.kind;
    v.step = ev.step;
    if (ev.kind === "denoise") {
      v.steps += 1;
      v.revealed += ev.slots.length;
      for (const [i, token, text, c] of ev.slots) v.slots[i] = { token, text, c, fresh: true };
    } else {
      for (const [i, token, text] of ev.slots) {
        const old = v.slots[i];
        v.slots[i] = { token, text, c: old ? old.c : 1, fresh: false };
      }
    }
  }

  // Draw the view; ``live`` also updates the counters (a replay leaves the run's final counters).
  function render(v, answer, live = true) {
    $("answer").textContent = answer === undefined ? v.answer : answer;
    const box = $("block");
    box.replaceChildren();
    v.slots.forEach((s, i) => {
      const el = document.createElement("span");
      el.className = "slot";
      if (!s && i === 0) {
        // a block's first token is chosen by the forward before the block (prefill or the previous commit)
        el.classList.add("masked", "seeded");
        el.textContent = "▸";
        el.title = "chosen by the forward before this block; shown when the block commits";
      } else if (!s) {
        el.classList.add("masked");
        el.textContent = "·";
        el.title = "masked";
      } else {
        el.textContent = s.text === "" ? "∅" : s.text;
        if (s.text === "") el.classList.add("special");
        if (v.kind === "commit") el.classList.add("committed");
        if (s.fresh) el.classList.add("fresh");
        el.style.setProperty("--c", String(0.15 + 0.75 * s.c));
        el.title = `token ${s.token}` + (s.text === "" ? " (end of text or a special token)" : "")
          + `, confidence ${fmt(s.c, 3)}`;
      }
      box.appendChild(el);
    });
    $("block-title").textContent = v.block < 0 ? "Current block"
      : v.kind === "commit" ? `Block ${v.block + 1}: committed after ${v.step} denoise steps`
        : `Block ${v.block + 1}: denoise step ${v.step + 1}`;
    if (!live) return;
    $("steps-seen").textContent = String(v.steps);
    if (v.forwards) {
      $("nfe").textContent = String(v.forwards);
      $("tpf").textContent = fmt(v.revealed / v.forwards, 2);
    }
  }

  // ---- a run -----------------------------------------------------------------------------------------------
  function readInput() {
    if (!image && $("url").value.trim()) useImage($("url").value.trim(), "URL");
    if (!image) throw new Error("Choose an image first: a file, drag and drop, paste, a URL or the example.");
    const prompt = $("prompt").value;
    if (!prompt.trim()) throw new Error("Type a prompt.");
    const input = { image_url: image.url, prompt, stream_steps: true };
    for (const name of ["max_tokens", "num_inference_steps", "block_length"]) {
      const raw = $(name).value.trim();
      if (raw === "") continue;
      const n = Number(raw);
      if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a whole number of at least 1.`);
      input[name] = n;
    }
    const th = $("threshold").value.trim();
    if (th !== "") {
      const x = Number(th);
      if (!Number.isFinite(x) || x < 0 || x > 1) throw new Error("threshold must be a number between 0 and 1.");
      input.threshold = x;
    }
    const mode = $("mode").value;
    if (mode !== "diffusion") input.mode = mode; // the endpoint's default stays an omitted field
    return input;
  }

  function resetOutput(mode) {
    showError("");
    ["nfe", "tpf", "tps", "queue"].forEach((id) => { $(id).textContent = "–"; });
    $("replay").hidden = true;
    render(newView(), "");
    $("legend").textContent = mode === "diffusion"
      ? "Grey slots are still masked (▸: the block's first token, chosen by the forward before it); revealed "
        + "tokens are shaded by the model's confidence (darker = more confident), outlined when this step revealed "
        + "them; a committed block turns green."
      : `Mode ${mode} has no denoise steps: the answer grows as tokens are accepted.`;
  }

  function busy(on) {
    $("run").disabled = on;
    $("cancel").disabled = !on;
  }

  async function start(ev) {
    ev.preventDefault();
    if (run) return;
    let input;
    try { input = readInput(); } catch (e) { showError(e.message); return; }
    if (!appId) { showError("The page could not read the server's configuration; reload it."); return; }
    resetOutput(input.mode || "diffusion");
    last = null;
    run = { id: null, events: [], view: newView(), t0: null, controller: new AbortController(), finished: false };
    busy(true);
    setState("submitting");
    say("Submitting…");
    try {
      const resp = await fetch(`${ORIGIN}/queue/${appId}`, {
        method: "POST", headers: authHeaders(true), body: JSON.stringify(input),
      });
      if (!resp.ok) { fail(await describe(resp)); return; }
      const sub = await resp.json();
      run.id = sub.request_id;
      document.body.dataset.requestId = run.id;
      $("queue").textContent = String(sub.queue_position);
      setState("queued");
      say(`In the queue (position ${sub.queue_position}).`);
      await follow();
    } catch (e) {
      if (run) fail(`Lost the connection to the server: ${e.message}`);
    }
  }

  const requestUrl = () => `${ORIGIN}/queue/${appId}/requests/${run.id}`;

  async function follow() {
    const resp = await fetch(`${requestUrl()}/steps`, { headers: authHeaders(false), signal: run.controller.signal });
    if (!resp.ok) { fail(await describe(resp)); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) await handle(JSON.parse(data));
        if (!run) return;
      }
    }
    if (run && !run.finished) fail("The event stream ended before the request finished.");
  }

  async function handle(ev) {
    if (ev.type === "status") {
      if (ev.status === "IN_QUEUE") {
        setState("queued");
        $("queue").textContent = String(ev.queue_position);
        say(`In the queue (position ${ev.queue_position}).`);
      } else if (ev.status === "IN_PROGRESS") {
        setState("running");
        run.t0 = performance.now();
        $("queue").textContent = "–";
        say("Running…");
      }
      return;
    }
    if (ev.type === "step" || ev.type === "output") {
      run.events.push(ev);
      apply(run.view, ev);
      render(run.view);
      if (run.t0 !== null && run.view.revealed) {
        $("tps").textContent = fmt(run.view.revealed / ((performance.now() - run.t0) / 1000), 1);
      }
      return;
    }
    if (ev.type === "done") await finish();
  }

  async function finish() {
    const current = run;
    current.finished = true;
    const resp = await fetch(requestUrl(), { headers: authHeaders(false) });
    let body = null;
    if (resp.ok) {
      body = await resp.json();
    } else {
      const copy = resp.clone();
      let err = null;
      try { err = await copy.json(); } catch (_) { /* not JSON */ }
      if (err && err.error_type === "request_cancelled") {
        run = null;
        busy(false);
        setState("cancelled");
        say(`Cancelled after ${current.view.forwards} forwards.`);
        keepForReplay(current, $("answer").textContent);
        return;
      }
      fail(await describe(resp));
      return;
    }
    run = null;
    busy(false);
    const u = body.usage;
    $("answer").textContent = body.output;
    $("nfe").textContent = String(u.num_function_evals);
    $("tpf").textContent = fmt(u.completion_tokens / u.num_function_evals, 2);
    $("tps").textContent = fmt(u.completion_tokens / body.timings.generation_time, 1);
    setState("done");
    say(`Done: ${u.completion_tokens} tokens in ${u.num_function_evals} forwards `
      + `(${fmt(body.timings.total_time, 3)} s on the server).`);
    keepForReplay(current, body.output);
  }

  function fail(message) {
    if (run) run.controller.abort();
    run = null;
    busy(false);
    setState("error");
    say("Failed.");
    showError(message);
  }

  // ---- replay ----------------------------------------------------------------------------------------------
  function keepForReplay(current, output) {
    const steps = current.events.filter((e) => e.type === "step").length;
    last = { events: current.events, output, steps };
    if (!steps) return;
    const slider = $("replay-step");
    slider.max = String(steps);
    slider.value = String(steps);
    $("replay").hidden = false;
    replay(steps);
  }

  function replay(k) {
    if (!last) return;
    const v = newView();
    let seen = 0;
    for (const ev of last.events) {
      if (ev.type === "step") {
        if (seen === k) break;
        seen += 1;
      }
      apply(v, ev);
    }
    render(v, k === last.steps ? last.output : v.answer, false);
    $("replay-label").textContent = k === 0 ? `Before the first forward (of ${last.steps} steps)`
      : `Step ${k} of ${last.steps}: ${v.kind === "commit" ? "commit" : "denoise"} of block ${v.block + 1}, `
        + `${v.forwards} forward${v.forwards === 1 ? "" : "s"}`;
  }

  function stepReplay(delta) {
    const slider = $("replay-step");
    const k = Math.min(Number(slider.max), Math.max(0, Number(slider.value) + delta));
    slider.value = String(k);
    replay(k);
  }

  // ---- cancel ----------------------------------------------------------------------------------------------
  async function cancel() {
    if (!run || !run.id) return;
    $("cancel").disabled = true;
    say("Cancelling…");
    try {
      const resp = await fetch(`${requestUrl()}/cancel`, { method: "PUT", headers: authHeaders(false) });
      if (!resp.ok && resp.status !== 400) showError(await describe(resp)); // 400: it had already finished
    } catch (e) {
      showError(`Could not send the cancel: ${e.message}`);
    }
  }

  // ---- wiring ----------------------------------------------------------------------------------------------
  async function init() {
    try {
      const resp = await fetch("playground/config.json");
      if (!resp.ok) throw new Error(await describe(resp));
      const cfg = await resp.json();
      appId = cfg.app_id;
      $("app-id").textContent = appId;
      $("key-hint").textContent = cfg.api_key_required ? "(this server requires one)" : "(optional)";
      $("use-example").hidden = !cfg.example_image;
    } catch (e) {
      showError(`Could not read the server's configuration: ${e.message}`);
    }
    $("form").addEventListener("submit", start);
    $("cancel").addEventListener("click", cancel);
    $("use-example").addEventListener("click", useExample);
    $("file").addEventListener("change", () => readFile($("file").files[0], $("file").files[0]?.name || "file"));
    $("url").addEventListener("input", () => {
      const url = $("url").value.trim();
      if (url) useImage(url, "URL"); else { image = null; $("preview").hidden = true; }
    });
    const drop = $("drop");
    drop.addEventListener("click", () => $("file").click());
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
    });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0];
      if (file) readFile(file, file.name || "dropped image");
      else showError("Drop an image file.");
    });
    document.addEventListener("paste", (e) => {
      const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) { e.preventDefault(); readFile(file, "pasted image"); }
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("form").requestSubmit(); }
    });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && run) cancel(); });
    $("replay-step").addEventListener("input", () => replay(Number($("replay-step").value)));
    $("replay-prev").addEventListener("click", () => stepReplay(-1));
    $("replay-next").addEventListener("click", () => stepReplay(1));
    setState("ready");
  }

  init();
})();
