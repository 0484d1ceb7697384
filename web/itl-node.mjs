// itl-run's command line on the WebAssembly build (web/itl.wasm, `make wasm`), under Node:
//   node web/itl-node.mjs ARTIFACT TOKENIZER_BIN [-p PROMPT] [-n N] [-t TEMP] [-k TOPK] [--top-p P] [-s SEED] [--ids]
//                         [--exact]
// (--exact: float activations in the step, as itl-run --exact.)
// Same defaults, checks, stdout and stderr as itl-run (iteralite/runtime/native/itl_run.c), with the
// prefix itl-wasm: stdout the prompt, then the story as it is generated (or, with --ids, the generated
// ids on one line); stderr, last line `itl-wasm: <n> tokens in <ms> ms, <x> tok/s (prompt <p> tokens,
// <ms> ms)`. Exit 0; bad input: one `itl-wasm: error: ...` line and exit 2 (1 when a file cannot be read).
import { readFileSync, statSync } from "node:fs";
import { Itl, ItlError } from "./itl.js";

const USAGE = `usage: itl-node.mjs ARTIFACT TOKENIZER_BIN [-p PROMPT] [-n N] [-t TEMP] [-k TOPK] [--top-p P] [-s SEED]
                    [--ids] [--exact]
  -p PROMPT   the prompt (default "Once upon a time")
  -n N        tokens to generate (default 200)
  -t TEMP     temperature: 0 = greedy, else in [0.001, 100] (default 0.8)
  -k TOPK     keep the k most likely tokens, 0 = all (default 0)
  --top-p P   keep the most likely tokens up to mass P in (0, 1], 1 = all (default 0.9)
  -s SEED     the sampler's seed, 0..2**64-1 (default 1)
  --ids       print the generated token ids instead of the text
  --exact     float activations (the eager model's arithmetic up to float rounding; slower)
              instead of int8 activations per block
`;
const MAX_TOKENS = 100000000;
const TAKES = new Set(["-p", "-n", "-t", "-k", "--top-p", "-s"]);

class Usage extends Error {}

function die(code, msg) {
    process.stderr.write(`itl-wasm: error: ${msg}\n`);
    process.exit(code);
}

const isInt = (v) => /^[-+]?[0-9]+$/.test(v);
const isNum = (v) => v.trim() !== "" && !Number.isNaN(Number(v)) && !/^[-+]?0x/i.test(v.trim());

function parse(argv) {
    const o = { prompt: "Once upon a time", n: 200, temperature: 0.8, topK: 0, topP: 0.9, seed: 1n, ids: false,
                exact: false };
    const pos = [];
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === "-h" || a === "--help") { process.stdout.write(USAGE); process.exit(0); }
        if (a === "--ids") { o.ids = true; continue; }
        if (a === "--exact") { o.exact = true; continue; }
        if (TAKES.has(a)) {
            if (i + 1 >= argv.length) throw new Usage(`${a} needs a value (itl-node.mjs --help)`);
            const v = argv[++i];
            if (a === "-p") o.prompt = v;
            else if (a === "-n" || a === "-k") {
                if (!isInt(v)) throw new Usage(`${a} must be an integer, got '${v}'`);
                o[a === "-n" ? "n" : "topK"] = Number(v);
            } else if (a === "-t" || a === "--top-p") {
                if (!isNum(v)) throw new Usage(`${a} must be a number, got '${v}'`);
                o[a === "-t" ? "temperature" : "topP"] = Number(v);
            } else {
                if (!/^[0-9]+$/.test(v) || BigInt(v) >= 1n << 64n)
                    throw new Usage(`-s must be in [0, 2**64 - 1] = [0, 18446744073709551615], got '${v}'`);
                o.seed = BigInt(v);
            }
            continue;
        }
        if (a.startsWith("-") && a.length > 1) throw new Usage(`unknown option '${a}' (itl-node.mjs --help)`);
        if (pos.length === 2)
            throw new Usage(`unexpected argument '${a}': itl-node.mjs takes ARTIFACT TOKENIZER_BIN ` +
                            "(itl-node.mjs --help)");
        pos.push(a);
    }
    if (pos.length < 2)
        throw new Usage(`missing ${pos.length ? "TOKENIZER_BIN" : "ARTIFACT and TOKENIZER_BIN"} ` +
                        "(usage: itl-node.mjs ARTIFACT TOKENIZER_BIN [options]; itl-node.mjs --help)");
    // itl-run's checks of the sampling flags
    if (o.n < 0) throw new Usage(`-n must be >= 0, got ${o.n}`);
    if (o.n > MAX_TOKENS) throw new Usage(`-n must be at most ${MAX_TOKENS}, got ${o.n}`);
    if (!Number.isFinite(o.temperature) || o.temperature < 0)
        throw new Usage(`-t must be >= 0 (0 = greedy) and finite, got ${o.temperature}`);
    if (o.temperature !== 0 && !(o.temperature >= 1e-3 && o.temperature <= 100))
        throw new Usage(`-t must be 0 (greedy) or in [0.001, 100], got ${o.temperature}`);
    if (o.topK < 0) throw new Usage(`-k must be >= 0 (0 = no top-k filter), got ${o.topK}`);
    if (o.topK > 2147483647) throw new Usage(`-k must be at most 2147483647, got ${o.topK}`);
    if (!(Number.isFinite(o.topP) && o.topP > 0 && o.topP <= 1))
        throw new Usage(`--top-p must be in (0, 1] (1 = no top-p filter), got ${o.topP}`);
    [o.artifact, o.tokenizer] = pos;
    return o;
}

function read(path, what) {
    try {
        if (statSync(path).isDirectory()) die(1, `${path}: cannot read the ${what}: is a directory`);
        return readFileSync(path);
    } catch (e) {
        die(1, `${path}: cannot read the ${what}: ${e.code === "ENOENT" ? "No such file or directory" : e.message}`);
    }
}

let o;
try {
    o = parse(process.argv.slice(2));
} catch (e) {
    if (e instanceof Usage) die(2, e.message);
    throw e;
}
const wasmPath = new URL("./itl.wasm", import.meta.url);
let itl;
try {
    itl = await Itl.create(readFileSync(wasmPath));
} catch (e) {
    die(1, e.code === "ENOENT" ? `${wasmPath.pathname} is missing: build it with \`make wasm\` (needs emscripten)`
                               : e.message);
}

// Each stage's failure names what it read, as itl-run's do.
const stage = (prefix, fn) => {
    try {
        return fn();
    } catch (e) {
        if (e instanceof ItlError) die(2, `${prefix}${e.message}`);
        throw e;
    }
};
const tokenizer = read(o.tokenizer, "tokenizer");
stage(`${o.tokenizer}: `, () => itl.loadTokenizer(tokenizer));
const artifact = read(o.artifact, "artifact");
stage(`${o.artifact}: `, () => itl.loadArtifact(artifact));
stage(`${o.artifact}: `, () => itl.session());
if (o.exact) itl.setExact(true);

const t0 = performance.now();
const promptTokens = stage("", () => itl.start(o.prompt, o));
const t1 = performance.now();
if (!o.ids) process.stdout.write(o.prompt);
const ids = [];
stage("", () => {
    for (let i = 0; i < o.n; i++) {
        const { id, bytes } = itl.next();
        if (o.ids) process.stdout.write(i ? ` ${id}` : `${id}`);
        else if (bytes.length) process.stdout.write(bytes);
        ids.push(id);
    }
});
const t2 = performance.now();
if (!o.ids) {
    const tail = itl.flush();
    if (tail.length) process.stdout.write(tail);
}
process.stdout.write("\n");
const ms = t2 - t1;
const rate = ms > 0 ? ids.length * 1e3 / ms : 0;
process.stderr.write(`itl-wasm: ${ids.length} tokens in ${ms.toFixed(1)} ms, ${rate.toFixed(1)} tok/s ` +
                     `(prompt ${promptTokens} tokens, ${(t1 - t0).toFixed(1)} ms)\n`);
