// The page's controls: sends a "generate" request to the worker (worker.js) and streams its text into
// #story. Fields can be preset from the query string (?artifact=&tokenizer=&prompt=&temperature=&top_p=
// &top_k=&seed=&n=&stop_at_end=0|1). The last result is kept in window.itlResult ({text, ids, ...}) and
// the body's data-state says idle / running / done / error (for scripted checks).
const $ = (id) => document.getElementById(id);
const story = $("story"), stats = $("stats"), go = $("generate"), stop = $("stop");
const FIELDS = { artifact: "artifact", tokenizer: "tokenizer", prompt: "prompt", temperature: "temperature",
                 top_p: "top-p", top_k: "top-k", seed: "seed", n: "n" };

const query = new URLSearchParams(location.search);
for (const [param, id] of Object.entries(FIELDS)) if (query.has(param)) $(id).value = query.get(param);
if (query.has("stop_at_end")) $("stop-at-end").checked = query.get("stop_at_end") !== "0";

const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
let generated = "", sizes = {};

function setState(state, line, error = false) {
    document.body.dataset.state = state;
    if (line !== undefined) stats.textContent = line;
    stats.classList.toggle("error", error);
    go.disabled = state === "running";
    stop.disabled = state !== "running";
}

const fmt = (x, digits = 0) =>
    x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const rate = (tokens, ms) => (ms > 0 ? fmt(tokens / (ms / 1000)) : "-");

function source(id) {
    const file = $(`${id}-file`).files[0];
    return file ? { file } : { url: new URL($(id).value.trim(), location.href).href };
}

function number(id, { int = false, min = -Infinity, max = Infinity } = {}) {
    const text = $(id).value.trim(), v = Number(text);
    if (text === "" || !Number.isFinite(v) || (int && !Number.isInteger(v)) || v < min || v > max)
        throw new Error(`${id} must be ${int ? "an integer" : "a number"} in ${min}..${max}; got "${text}"`);
    return v;
}

go.addEventListener("click", () => {
    let msg;
    try {
        msg = {
            type: "generate", artifact: source("artifact"), tokenizer: source("tokenizer"), prompt: $("prompt").value,
            temperature: number("temperature", { min: 0 }), topP: number("top-p", { min: 0, max: 1 }),
            topK: number("top-k", { int: true, min: 0 }),
            seed: number("seed", { int: true, min: 0, max: Number.MAX_SAFE_INTEGER }),
            n: number("n", { int: true, min: 1, max: 1e6 }), stopAtEnd: $("stop-at-end").checked,
        };
    } catch (e) {
        setState("error", e.message, true);
        return;
    }
    generated = "";
    window.itlResult = null;
    story.textContent = "";
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = msg.prompt;
    story.append(p);
    setState("running", "starting");
    worker.postMessage(msg);
});

stop.addEventListener("click", () => worker.postMessage({ type: "stop" }));

worker.onmessage = (e) => {
    const m = e.data;
    if (m.type === "status") {
        if (m.what) sizes[m.what] = m.bytes;
        stats.textContent = m.text;
    } else if (m.type === "text") {
        generated += m.text;
        story.append(m.text);
        stats.textContent = `${fmt(m.tokens)} tokens, ${rate(m.tokens, m.ms)} tok/s`;
    } else if (m.type === "done") {
        generated += m.text;
        story.append(m.text);
        window.itlResult = { text: generated, ids: m.ids, tokens: m.tokens, ms: m.ms, promptTokens: m.promptTokens };
        const loaded = Object.entries(sizes).map(([k, v]) => `${k} ${fmt(v)} B`).join(", ");
        const how = m.stopped ? "stopped: " : m.ended ? "the end: " : "";
        setState("done", `${how}${fmt(m.tokens)} tokens in ${fmt(m.ms, 1)} ms, ` +
                         `${rate(m.tokens, m.ms)} tok/s (prompt ${m.promptTokens} tokens, ${fmt(m.promptMs, 1)} ms)\n` +
                         `loaded: ${loaded}`);
    } else if (m.type === "error") {
        setState("error", `error: ${m.message}`, true);
    }
};
worker.onerror = (e) => setState("error", `error: the worker failed: ${e.message || "could not start"}`, true);
