// The WebAssembly runtime (web/itl.wasm, built by `make wasm` from iteralite/runtime/native/*.c) as a
// small ES module for browsers, Web Workers and Node: no Emscripten JavaScript glue, no network.
//   const itl = await Itl.create(wasmBytes);
//   itl.loadArtifact(bytes); itl.loadTokenizer(bytes);
//   itl.start("Once upon a time", {temperature: 0.8, topP: 0.9, topK: 0, seed: 0});
//   const {id, bytes} = itl.next();   // one token: its id and the UTF-8 bytes it adds
//   itl.flush();                      // the bytes held back at the end
// Every failure throws an ItlError whose message is the C side's one line.

export class ItlError extends Error {}

// Imports the module may name: the memory-growth hook is a no-op (views are rebuilt on each access),
// the environment is empty, and any other system call (the C code reads no files here) answers
// "not supported" instead of crashing.
function importsFor(module, memory) {
    const imports = {};
    for (const { module: mod, name, kind } of WebAssembly.Module.imports(module)) {
        if (kind !== "function")
            throw new ItlError(`itl.wasm imports ${mod}.${name} (${kind}); rebuild it with \`make wasm\``);
        imports[mod] ??= {};
        if (name === "emscripten_notify_memory_growth") imports[mod][name] = () => {};
        else if (name === "environ_sizes_get" || name === "args_sizes_get") // none: two zero counts
            imports[mod][name] = (count, size) => {
                const view = new DataView(memory().buffer);
                view.setUint32(count, 0, true);
                view.setUint32(size, 0, true);
                return 0;
            };
        else if (name === "proc_exit")
            imports[mod][name] = (code) => { throw new ItlError(`itl.wasm exited with status ${code}`); };
        else imports[mod][name] = () => 52; // WASI ENOSYS
    }
    return imports;
}

function seedHalves(seed) {
    const s = BigInt(seed);
    if (s < 0n || s >= 1n << 64n) throw new ItlError(`seed must be in 0..2^64-1; got ${seed}`);
    return [Number(s & 0xffffffffn), Number(s >> 32n)];
}

export class Itl {
    static async create(wasmBytes) {
        const module = await WebAssembly.compile(wasmBytes);
        let instance = null;
        instance = await WebAssembly.instantiate(module, importsFor(module, () => instance.exports.memory));
        return new Itl(instance);
    }

    constructor(instance) {
        this.x = instance.exports;
        if (this.x._initialize) this.x._initialize();
        this.utf8 = new TextEncoder();
    }

    get heap() { return new Uint8Array(this.x.memory.buffer); } // a fresh view: memory may have grown

    error() {
        const p = this.x.itl_wasm_error(), h = this.heap;
        let end = p;
        while (h[end] !== 0) end++;
        return new TextDecoder().decode(h.subarray(p, end));
    }

    check(code) {
        if (code < 0) throw new ItlError(this.error());
        return code;
    }

    // Copy bytes into wasm memory, call fn(ptr, len), free them.
    withBytes(bytes, fn) {
        const p = this.x.itl_wasm_alloc(bytes.length);
        if (!p) throw new ItlError(`out of memory for ${bytes.length} bytes`);
        try {
            this.heap.set(bytes, p);
            return fn(p, bytes.length);
        } finally {
            this.x.itl_wasm_free(p);
        }
    }

    loadArtifact(bytes) { this.check(this.withBytes(bytes, (p, n) => this.x.itl_wasm_load_artifact(p, n))); }
    loadTokenizer(bytes) { this.check(this.withBytes(bytes, (p, n) => this.x.itl_wasm_load_tokenizer(p, n))); }
    get vocab() { return this.x.itl_wasm_vocab(); }
    get eot() { return this.x.itl_wasm_eot(); } // the end-of-text id, -1 when none
    // Exact mode: float activations in the step (the eager model's arithmetic up to float rounding)
    // instead of int8 activations; kept for later sessions, used from the next start.
    setExact(on) { return this.x.itl_wasm_set_exact(on ? 1 : 0) === 1; }
    // Check that the loaded artifact and tokenizer fit together (start does it too).
    session() { this.check(this.x.itl_wasm_session()); }

    // Encode and prefill the prompt; temperature 0 is greedy, topK 0 and topP 1 are off.
    start(prompt, { temperature = 0, topP = 1, topK = 0, seed = 0 } = {}) {
        const [lo, hi] = seedHalves(seed);
        const text = typeof prompt === "string" ? this.utf8.encode(prompt) : prompt;
        this.check(this.withBytes(text, (p, n) => this.x.itl_wasm_start(p, n, temperature, topP, topK, lo, hi)));
        return this.promptTokens;
    }

    get promptTokens() { return this.x.itl_wasm_prompt_tokens(); }

    // The next token: {id, bytes} (bytes is a copy, possibly empty).
    next() {
        const id = this.check(this.x.itl_wasm_next());
        const p = this.x.itl_wasm_piece(), n = this.x.itl_wasm_piece_len();
        return { id, bytes: this.piece(p, n) };
    }

    // The bytes held back at the end (an incomplete UTF-8 sequence), once the story is over.
    flush() {
        const n = this.x.itl_wasm_flush();
        return this.piece(this.x.itl_wasm_piece(), n);
    }

    piece(p, n) { return n > 0 ? this.heap.slice(p, p + n) : new Uint8Array(0); }
}
