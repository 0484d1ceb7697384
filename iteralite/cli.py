"""`iteralite` command line: generate text from any artifact, evaluate one, or serve one over HTTP.

Exit status: 0 done; 2 a bad argument or an unusable file, or stdout that cannot be written (closed,
a full disk), each said in one `iteralite: error: ...` line; 130 after Ctrl-C; 141 (128 + SIGPIPE,
what a shell shows for `yes | head`) when the reader of stdout went away, quietly: `| head` is a
normal way to stop reading.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import stat
import sys
from pathlib import Path

from iteralite.io.errors import IteraliteError
from iteralite.io.text import decode_utf8


class _StdoutFailed(Exception):
    """stdout refused a write (errno: EPIPE for a reader gone, EBADF for a closed stdout, ...)."""

    def __init__(self, code: int | None):
        super().__init__(code)
        self.errno = code or errno.EIO


def _emit(text: str) -> None:
    """Write `text` to stdout and flush it; any failure is a _StdoutFailed."""
    out = sys.stdout
    if out is None:  # started with stdout closed (`>&-`)
        raise _StdoutFailed(errno.EBADF)
    try:
        out.write(text)
        out.flush()
    except OSError as e:
        raise _StdoutFailed(e.errno) from None
    except ValueError:  # "I/O operation on closed file"
        raise _StdoutFailed(errno.EBADF) from None


def _stdout_failed(e: _StdoutFailed) -> int:
    """Point stdout at /dev/null (the interpreter's last flush then cannot fail again), then the
    exit status: 141 quietly for a reader gone, else one line and 2."""
    try:
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (AttributeError, OSError, ValueError):  # no stdout, or not a real file (a test's capture)
        pass
    if e.errno == errno.EPIPE:
        return 141
    reason = "stdout is closed" if e.errno == errno.EBADF else f"cannot write to stdout: {os.strerror(e.errno)}"
    print(f"iteralite: error: {reason}; the output was not written (redirect stdout to a writable file)",
          file=sys.stderr)
    return 2


def _check_relative(path, flag: str) -> None:
    """A relative path that does not exist (a default, run from another folder) is one line naming
    the absolute path looked at, not advice to rebuild what exists elsewhere."""
    if not os.path.isabs(path) and not os.path.lexists(path):
        raise IteraliteError(
            f"{flag} {path}: no such file: looked for {os.path.abspath(path)} (relative to the working "
            f"directory {os.getcwd()}); run iteralite from the repository root or pass {flag} with the "
            "file's path (`dvc repro` or `dvc pull` creates it)")


def _load(args):
    from iteralite.io.checkpoint import load_checked_tokenizer, load_model

    _check_relative(args.checkpoint, "--checkpoint")
    _check_relative(args.tokenizer, "--tokenizer")
    model, ckpt = load_model(args.checkpoint)
    # Before the tokenizer is used: a directory, a missing file, another tokenizer or another
    # vocabulary size are each one clear line, not a library error or silently wrong text. The
    # tokenizer returned is the very file checked (read once).
    tok = load_checked_tokenizer(ckpt, args.tokenizer)
    args.checked_tokenizer = tok  # --compile sizes its prefill with it
    return _runtime(model, ckpt, args), ckpt, tok


def _fused(model, ckpt, args):
    """The fused model: eager fused ops by default, or compiled (step + this prompt's prefill)
    with --compile."""
    from iteralite.runtime.deploy import fuse

    if not getattr(args, "compile", False):
        return fuse(model, "eager")
    n = len(args.checked_tokenizer.encode(args.prompt, add_special_tokens=False).ids) or 1
    return fuse(model, ckpt.meta.get("runtime", {}).get("backend", "aoti"), [n])


def _native(model, ckpt, args):
    """The C step over the packed codes (NativeUnsupported / NativeUnavailable say why not)."""
    from iteralite.runtime.native.runtime import NativeIteraLite
    return NativeIteraLite.from_model(model)


RUNTIMES = {"native": _native, "fused": _fused, "eager": lambda model, ckpt, args: model}


def _runtime(model, ckpt, args):
    """--runtime: native (the C step; the default, `auto`, wherever the artifact is packed and the
    library is built), fused (the fused ops; auto's choice for the fuse stage's artifact when
    native cannot run it) or eager (the model as loaded)."""
    choice = getattr(args, "runtime", "auto")
    if choice != "auto":
        return RUNTIMES[choice](model, ckpt, args)
    from iteralite.runtime.native.layout import NativeUnsupported
    from iteralite.runtime.native.library import NativeUnavailable
    try:
        return _native(model, ckpt, args)
    except (NativeUnsupported, NativeUnavailable):
        return RUNTIMES["fused" if ckpt.kind == "fused" else "eager"](model, ckpt, args)


def _cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


DEFAULT_PROMPT = "Once upon a time"


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text: `prompt`, or the UTF-8 text of `prompt_file` or stdin (`-` for either).

    One trailing newline (what `echo` and editors add) is dropped, as llama.cpp's `-f` does, so
    `echo "Once upon a time" | iteralite generate --prompt -` continues the line, not a new one.
    """
    if prompt_file is None and prompt != "-":
        return DEFAULT_PROMPT if prompt is None else prompt
    source = "-" if prompt_file is None else prompt_file
    if source == "-":
        name, stdin = "stdin", getattr(sys.stdin, "buffer", None)
        if stdin is None:
            raise IteraliteError("stdin is closed: no prompt to read (pass --prompt TEXT or --prompt-file PATH)")
        if stdin.isatty():  # otherwise it would look like a hang
            print("iteralite: reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        try:
            data = stdin.read()
        except OSError as e:
            raise IteraliteError(f"stdin: cannot read the prompt: {e.strerror or e}") from None
    else:
        name = f"--prompt-file {source}"
        try:  # not only regular files: `--prompt-file <(cmd)` is a pipe
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise IteraliteError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise IteraliteError(f"{name}: is a directory, not a prompt file") from None
        except OSError as e:  # permission denied, a symlink loop, ...
            raise IteraliteError(f"{name}: cannot read the prompt file: {e.strerror or e}") from None
    text = decode_utf8(data, name).removeprefix("\ufeff")  # a BOM (Windows editors) is not text
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def cmd_generate(args) -> None:
    from iteralite.train.generate import check_prompt, check_sampling, stream_text

    # Every argument is checked, and the prompt read, before anything is loaded.
    check_sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, top_p=args.top_p)
    cpus = _cpu_count()
    if not 0 <= args.threads <= cpus:  # torch overflows, or crashes, on absurd thread counts
        raise IteraliteError(f"--threads must be in [0, {cpus}] (0 = torch default; at most the "
                             f"{cpus} CPUs here), got {args.threads}")
    args.prompt = read_prompt(args.prompt, args.prompt_file)  # --compile sizes its prefill from it
    check_prompt(args.prompt)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt, tok = _load(args)

    _emit(args.prompt)
    timing: dict = {}
    try:
        stream_text(tok, _FiniteLogits(model), args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                    args.seed, _emit, timing, top_p=args.top_p, sampler=args.sampler)
    except IteraliteError:
        _emit("\n")  # end the line the prompt began; the error line follows on stderr
        raise
    except KeyboardInterrupt:
        # Ctrl-C ends the story where it is: keep what was shown, end the line, no traceback.
        try:
            _emit("\n")
        except _StdoutFailed:
            pass
        raise
    _emit("\n")
    print(timing_line(type(model).__name__, timing), file=sys.stderr)


class _FiniteLogits:
    """A runtime whose logits are checked: weights that are finite but overflow float32 give NaN/inf
    logits, which greedy decoding would turn into silent garbage and sampling into a torch error."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def _check(out):
        import torch

        if not bool(torch.isfinite(out[0]).all()):
            raise IteraliteError("the model's logits are not finite (NaN/inf: its weights overflow float32); "
                                 "it cannot generate: re-create the checkpoint with `dvc repro`")
        return out

    def __call__(self, *args, **kwargs):
        return self._check(self.model(*args, **kwargs))

    def step(self, *args, **kwargs):
        return self._check(self.model.step(*args, **kwargs))


def timing_line(runtime: str, t: dict) -> str:
    """'[Runtime] prompt N tokens in X ms (R tok/s), generated M tokens in Y ms (S tok/s)'."""
    def rate(n, s):
        return f"{n / s:,.0f} tok/s" if s > 0 and n else "- tok/s"
    return (f"[{runtime}] prompt {t['prompt_tokens']} tokens in {1000 * t['prompt_s']:.1f} ms "
            f"({rate(t['prompt_tokens'], t['prompt_s'])}), generated {t['gen_tokens']} tokens in "
            f"{1000 * t['gen_s']:.1f} ms ({rate(t['gen_tokens'], t['gen_s'])})")


def _eval_config(args):
    """The `eval` section of --params (the settings the pipeline's stages score with), with the
    --seq-len/--batch-size/--max-tokens overrides; validated before anything is loaded."""
    import dataclasses

    from iteralite.io.errors import ParamsError
    from iteralite.io.params import load_section
    from iteralite.train.evaluate import EvalConfig

    path = Path(args.params)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:  # permission denied on a folder, a symlink loop, ...
        raise ParamsError(f"{path}: cannot read the params file: {e.strerror}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ParamsError(f"{path}: is a directory, not a params file (pass --params params.yaml)")
    if mode is not None and not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise ParamsError(f"{path}: is not a regular file, not a params file (pass --params params.yaml)")
    if mode is not None:
        try:
            cfg, source = load_section(EvalConfig, "eval", path), str(path)
        except UnicodeDecodeError as e:
            raise ParamsError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
        except OSError as e:
            raise ParamsError(f"{path}: cannot read the params file: {e.strerror}") from None
    else:
        cfg, source = EvalConfig(), None
        print(f"iteralite: {path} not found{_looked_for(path)}; using the default eval settings "
              f"{dataclasses.asdict(cfg)} (pass --params to use the pipeline's)", file=sys.stderr)
    overrides = {k: v for k, v in (("seq_len", args.seq_len), ("batch_size", args.batch_size),
                                   ("max_tokens", args.max_tokens)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        cfg.validate("eval")
    except ParamsError as e:
        # The file's values were validated on loading, so an override is out of range: name the flag.
        raise _with_flags(e, overrides) from None
    return cfg, source


def _looked_for(path) -> str:
    return "" if os.path.isabs(path) else f" (looked for {os.path.abspath(path)})"


def _with_flags(e, overrides: dict):
    """`e` (a ParamsError naming 'eval.<key>') with the command-line flags that set those keys."""
    from iteralite.io.errors import ParamsError

    flags = [f"--{k.replace('_', '-')} {v}" for k, v in overrides.items() if f"'eval.{k}'" in str(e)]
    return ParamsError(f"{e} (from {', '.join(flags)})" if flags else str(e))


def _token_array(path: Path, vocab: int, tokenizer) -> "np.ndarray":
    """A 1-D integer .npy token array of ids < `vocab`, checked before use: a missing, truncated or
    padded file, another array or an id the tokenizer does not have is one line naming the file."""
    import numpy as np

    from iteralite.io.checkpoint import CheckpointError, _check_regular_file, _open_regular
    from iteralite.io.errors import DataError

    hint = "(evaluate reads valid.npy and wikitext2.npy beside --tokenizer; `dvc repro tokenizer` writes them)"
    try:
        _check_regular_file(path, "token array", hint)
        with _open_regular(path, "token array") as f:
            major, _ = np.lib.format.read_magic(f)
            read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
            if read is None:
                raise ValueError(f".npy format version {major} is not one numpy's np.save writes here")
            shape, _, dtype = read(f)
            if len(shape) != 1 or dtype.kind not in "ui":
                raise ValueError(f"holds a {dtype} array of shape {shape}, not a 1-D array of token ids")
            need, have = shape[0] * dtype.itemsize, os.fstat(f.fileno()).st_size - f.tell()
            if need != have:
                raise DataError(f"{path}: truncated or padded token array: its header says {shape[0]:,} tokens "
                                f"({need:,} bytes) but {have:,} bytes follow; re-create it with `dvc repro tokenizer`")
            arr = np.frombuffer(f.read(need), dtype=dtype)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    except (ValueError, EOFError, SyntaxError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path}: not a token array (.npy): {reason}; re-create it with `dvc repro tokenizer`") from None
    if arr.size and (int(arr.max()) >= vocab or int(arr.min()) < 0):
        bad = int(arr.max()) if int(arr.max()) >= vocab else int(arr.min())
        raise DataError(f"{path}: holds token id {bad}, but tokenizer {tokenizer} has {vocab} tokens (ids 0..{vocab - 1}): "
                        "the array was encoded with another tokenizer; re-create them together with `dvc repro tokenizer`")
    return arr


def _evaluator(cfg, tokenizer_path: Path, tok):
    """The stages' Evaluator, but scoring bytes with `tok` (the tokenizer file passed and checked,
    whatever its name) and reading the splits beside it with `_token_array`'s checks."""
    from iteralite.data.tokenizer import token_bytes
    from iteralite.train.evaluate import Evaluator

    class _Exact(Evaluator):
        def __init__(self):  # Evaluator.__init__ would read <folder>/tokenizer.json: another file
            self.cfg = cfg
            self.nbytes = token_bytes(tok)
            folder, vocab = tokenizer_path.parent, tok.get_vocab_size()
            self.valid = _token_array(folder / "valid.npy", vocab, tokenizer_path)
            self.wiki = _token_array(folder / "wikitext2.npy", vocab, tokenizer_path)
            for split, tokens in (("valid", self.valid), ("wikitext2", self.wiki)):
                self.check_window(split, len(tokens), cfg.max_tokens, "eval.max_tokens")

    return _Exact()


def cmd_evaluate(args) -> None:
    import dataclasses

    from iteralite.io.errors import ParamsError

    cfg, source = _eval_config(args)
    model, ckpt, tok = _load(args)
    try:
        ev = _evaluator(cfg, Path(args.tokenizer), tok)
    except ParamsError as e:  # a window that does not fit a split: name the flag that set it
        raise _with_flags(e, {k: getattr(args, k) for k in ("seq_len", "max_tokens")
                              if getattr(args, k) is not None}) from None
    scores = ev(model)
    bad = next((k for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad is not None:  # JSON has no NaN: never print one, never exit 0 with it
        raise IteraliteError(f"{args.checkpoint}: {bad} is {scores[bad]}: the model's outputs are not finite "
                             "on this data (its weights overflow); nothing to report")
    settings = {**dataclasses.asdict(cfg), "params": source}
    _emit(json.dumps({"checkpoint": str(args.checkpoint), "kind": ckpt.kind, "eval": settings, **scores},
                     indent=2, allow_nan=False) + "\n")


def cmd_serve(args) -> int:
    """The completions server (iteralite/serve): arguments checked before anything is loaded."""
    from iteralite.serve.app import model_name, serve
    from iteralite.serve.engine import Engine, runtime_pool
    from iteralite.serve.protocol import Limits

    for flag, value, lo, hi in (("--port", args.port, 0, 65535), ("--workers", args.workers, 1, 256),
                                ("--queue", args.queue, 0, 100_000), ("--max-tokens", args.max_tokens, 1, 1 << 20),
                                ("--context", args.context, 1, 1 << 24)):
        if not lo <= value <= hi:
            raise IteraliteError(f"{flag} must be in [{lo}, {hi}], got {value}")
    if args.max_tokens > args.context:
        raise IteraliteError(f"--max-tokens ({args.max_tokens}) must be <= --context ({args.context})")
    runtime, _, tok = _load(args)
    engine = Engine(runtime_pool(runtime, args.workers), tok, model_name(args.checkpoint),
                    Limits(max_tokens=args.max_tokens, context=args.context), queue=args.queue)
    return serve(engine, args.host, args.port)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `iteralite: error: ...` line like every other error
    (the subcommand parsers are made by this class too)."""

    def error(self, message):
        self.exit(2, f"iteralite: error: {message} (see `{self.prog} --help`)\n")


def main(argv=None) -> int:
    p = _Parser(prog="iteralite", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream a story from a checkpoint (any artifact kind)")
    g.add_argument("--checkpoint", default="checkpoints/fp32.safetensors")
    g.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help=f"the text to continue (default: {DEFAULT_PROMPT!r}); - reads it from stdin")
    src.add_argument("--prompt-file", metavar="PATH",
                     help="read the prompt from this UTF-8 file (- = stdin); one trailing newline is dropped")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8,
                   help="divide the logits by this first; 0 = greedy (top-k and top-p then do nothing); "
                        "default %(default)s")
    g.add_argument("--top-k", type=int, default=40,
                   help="then keep the k most likely tokens; 0 = no top-k filter; default %(default)s")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="then keep the smallest set of most likely tokens whose probability reaches P "
                        "(nucleus sampling), 0 < P <= 1; 1 = no top-p filter (the default)")
    g.add_argument("--seed", type=int, default=0, help="the same seed and flags give the same story")
    g.add_argument("--sampler", choices=["auto", "c", "torch"], default="auto",
                   help="the random draw: c = the C sampler of itl-run and the web page (same seed, same "
                        "story), torch = PyTorch's; auto = c where the native text library is built")
    g.add_argument("--threads", type=int, default=0, help="0 = torch default")
    g.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="native: the C step over the packed codes (auto's choice for packed artifacts); "
                        "fused: the fused ops; eager: the model as loaded")
    g.add_argument("--compile", action="store_true",
                   help="fused artifacts: compile the step and this prompt's prefill first (~40 s), then decode fast")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("evaluate", help="validation ppl/bpb and WikiText-2 ppl of a checkpoint")
    e.add_argument("--checkpoint", default="checkpoints/fp32.safetensors")
    e.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    e.add_argument("--params", default="params.yaml",
                   help="its `eval` section gives the settings the pipeline's stages score with")
    e.add_argument("--seq-len", type=int, default=None, help="override eval.seq_len")
    e.add_argument("--batch-size", type=int, default=None, help="override eval.batch_size")
    e.add_argument("--max-tokens", type=int, default=None,
                   help="override eval.max_tokens: tokens scored per split (0 = all)")
    e.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("serve", help="an OpenAI-compatible completions server (POST /v1/completions)")
    s.add_argument("--checkpoint", default="checkpoints/mixed.safetensors")
    s.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="0 = any free port (printed on start); default %(default)s")
    s.add_argument("--workers", type=int, default=min(4, _cpu_count()),
                   help="requests decoded at once, one runtime instance each; default %(default)s")
    s.add_argument("--queue", type=int, default=16,
                   help="requests that may wait for a worker; beyond that 503 + Retry-After; default %(default)s")
    s.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask; default %(default)s")
    s.add_argument("--context", type=int, default=2048,
                   help="prompt tokens + max_tokens of one request at most; default %(default)s")
    s.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="as for generate: native (auto's choice for packed artifacts), fused or eager")
    s.set_defaults(func=cmd_serve)
    args = p.parse_args(argv)
    try:
        status = args.func(args)
        if status:
            return status
    except IteraliteError as e:
        print(f"iteralite: error: {e}", file=sys.stderr)
        return 2
    except _StdoutFailed as e:
        return _stdout_failed(e)
    except BrokenPipeError:
        return _stdout_failed(_StdoutFailed(errno.EPIPE))
    except KeyboardInterrupt:
        return 130  # the shell's status for SIGINT; cmd_generate already ended the line
    return 0


if __name__ == "__main__":
    sys.exit(main())
