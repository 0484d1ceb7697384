// The page's generation worker (a module worker): loads web/itl.wasm, the artifact and the tokenizer
// (from a URL or a picked File; each is kept until another one is asked for), then generates in
// slices of about 30 ms, posting the new text after each, so the page stays responsive and "stop"
// is seen between slices. With msg.stopAtEnd the story ends at <|endoftext|> (whose text is not shown).
// Messages in: {type: "generate", ...}, {type: "stop"}. Out: "status", "text", "done", "error" (one line).
import { Itl } from "./itl.js";

let itl = null;
const loaded = { artifact: null, tokenizer: null }; // the key of what is loaded
let stopping = false;

const post = (msg) => self.postMessage(msg);

// A source is {url} or {file}; its key says whether it is already loaded.
const keyOf = (src) => (src.file ? `file:${src.file.name}:${src.file.size}:${src.file.lastModified}`
                                 : `url:${src.url}`);

async function bytesOf(src, what) {
    if (src.file) return new Uint8Array(await src.file.arrayBuffer());
    let r;
    try {
        r = await fetch(src.url);
    } catch (e) {
        throw new Error(`cannot fetch the ${what} ${src.url}: ${e.message}`);
    }
    if (!r.ok) throw new Error(`cannot fetch the ${what} ${src.url}: HTTP ${r.status}`);
    return new Uint8Array(await r.arrayBuffer());
}

async function ensure(msg) {
    if (!itl) {
        post({ type: "status", text: "loading itl.wasm" });
        const r = await fetch(new URL("./itl.wasm", import.meta.url));
        if (!r.ok) throw new Error(`web/itl.wasm is missing (HTTP ${r.status}): build it with \`make wasm\``);
        itl = await Itl.create(new Uint8Array(await r.arrayBuffer()));
    }
    for (const what of ["artifact", "tokenizer"]) {
        const src = msg[what], key = keyOf(src);
        if (loaded[what] === key) continue;
        post({ type: "status", text: `loading the ${what}` });
        const bytes = await bytesOf(src, what);
        loaded[what] = null;
        if (what === "artifact") itl.loadArtifact(bytes);
        else itl.loadTokenizer(bytes);
        loaded[what] = key;
        post({ type: "status", text: `${what}: ${bytes.length.toLocaleString("en-US")} bytes`, what,
               bytes: bytes.length });
    }
}

// A zero-delay yield (setTimeout is clamped to 4 ms when nested).
const channel = new MessageChannel();
const yieldNow = () => new Promise((resolve) => {
    channel.port1.onmessage = resolve;
    channel.port2.postMessage(0);
});

async function generate(msg) {
    stopping = false;
    await ensure(msg);
    const t0 = performance.now();
    const promptTokens = itl.start(msg.prompt, msg);
    const promptMs = performance.now() - t0;
    const decoder = new TextDecoder();
    const ids = [], eot = msg.stopAtEnd ? itl.eot : -1;
    let ms = 0, ended = false;
    post({ type: "status", text: "generating" });
    while (ids.length < msg.n && !stopping && !ended) {
        const s = performance.now();
        let text = "";
        do {
            const { id, bytes } = itl.next();
            ids.push(id);
            ended = id === eot;
            if (bytes.length && !ended) text += decoder.decode(bytes, { stream: true });
        } while (ids.length < msg.n && !ended && performance.now() - s < 30);
        ms += performance.now() - s;
        post({ type: "text", text, tokens: ids.length, ms });
        await yieldNow();
    }
    const tail = decoder.decode(ended ? new Uint8Array(0) : itl.flush());
    post({ type: "done", text: tail, ids, tokens: ids.length, ms, promptTokens, promptMs, stopped: stopping, ended });
}

self.onmessage = async (e) => {
    const msg = e.data;
    if (msg.type === "stop") {
        stopping = true;
        return;
    }
    if (msg.type !== "generate") return;
    try {
        await generate(msg);
    } catch (err) {
        post({ type: "error", message: String(err.message || err).split("\n")[0] });
    }
};
