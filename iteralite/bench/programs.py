"""The stand-alone programs of the benchmark: the headline artifact run by `itl-run` (the C
program: artifact reader, tokenizer and greedy loop in C) and by the wasm build under Node
(`node web/itl-node.mjs`), both through their command line:

    PROGRAM ARTIFACT TOKENIZER_BIN -p PROMPT -n N -t 0 --ids
    stdout: the generated ids, space-separated; stderr, last line:
    `<prefix>: <n> tokens in <ms> ms, <x> tok/s (prompt <p> tokens, <ms> ms)`

A row records the program's own decode tokens/s (the median over repeats of that line) and its
greedy agreement with the eager model of the same artifact; a program not built here gives a row
`available: false` with the reason, and so does one that fails (its error line recorded), so
the rest of the benchmark stands. `instructions_per_token` counts the C step's instructions
with callgrind on itl-run: Ir(N2 tokens) - Ir(N1 tokens) over N2 - N1, so loading and the prompt
cancel out; a count, so it repeats from run to run where wall-clock does not.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iteralite.bench.variants import resolve
from iteralite.io.errors import IteraliteError

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


class ProgramMissing(IteraliteError):
    """The program is not built (or its interpreter is missing) here."""


class ProgramFailed(IteraliteError):
    """The program ran but broke its contract (exit status or output)."""


@dataclass(frozen=True)
class Program:
    """label: what the program's loop is (the row's `best_loop`); prefix: its stderr prefix;
    argv: "module:attr" of fn() -> the command before its arguments (ProgramMissing if not built);
    flags: added to every run (`--exact`: float activations); native: the variant kind whose C
    greedy ids the program must reproduce ("native" or "native_exact")."""
    label: str
    prefix: str
    argv: str
    flags: tuple[str, ...] = ()
    native: str = "native"


def itl_run_argv() -> list[str]:
    try:
        from iteralite.runtime.native.itlrun import binary_path
    except ImportError:
        raise ProgramMissing("iteralite/runtime/native/itlrun.py is missing") from None
    path = binary_path()
    if not path:
        raise ProgramMissing("itl-run is not built here (the README's setup, `make setup`, builds it)")
    return [str(path)]


def wasm_argv() -> list[str]:
    node, runner, wasm = shutil.which("node"), ROOT / "web" / "itl-node.mjs", ROOT / "web" / "itl.wasm"
    if node is None:
        raise ProgramMissing("node is not installed")
    for f, fix in ((runner, "the Node runner"), (wasm, "the wasm build (`make wasm`)")):
        if not f.is_file():
            raise ProgramMissing(f"{f.relative_to(ROOT)} is missing ({fix})")
    return [node, str(runner)]


EXACT = ("--exact",)
PROGRAMS: dict[str, Program] = {
    "itl_run": Program("itl-run, the C program (artifact reader, tokenizer, greedy loop in C)", "itl-run",
                       "iteralite.bench.programs:itl_run_argv"),
    "itl_run_exact": Program("itl-run --exact (float activations: the eager model's arithmetic)", "itl-run",
                             "iteralite.bench.programs:itl_run_argv", EXACT, "native_exact"),
    "wasm": Program("the wasm build under Node (node web/itl-node.mjs)", "itl-wasm",
                    "iteralite.bench.programs:wasm_argv"),
    "wasm_exact": Program("the wasm build under Node, --exact (float activations)", "itl-wasm",
                          "iteralite.bench.programs:wasm_argv", EXACT, "native_exact"),
}


@dataclass
class Generation:
    ids: list[int]
    tok_s: float
    prompt_tokens: int
    prefill_ms: float


def _line_re(prefix: str) -> re.Pattern:
    num = r"([0-9.]+(?:[eE][-+]?[0-9]+)?)"
    return re.compile(rf"^{re.escape(prefix)}: (\d+) tokens in {num} ms, {num} tok/s "
                      rf"\(prompt (\d+) tokens, {num} ms\)$")


def generate(program: Program, argv: list[str], artifact, tokenizer_bin, prompt: str, n: int) -> Generation:
    """One greedy run of the program: its ids and its own timing line."""
    args = [*argv, str(artifact), str(tokenizer_bin), "-p", prompt, "-n", str(n), "-t", "0", "--ids", *program.flags]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProgramFailed(f"{program.prefix} did not run: {e}") from None
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else ""
    if proc.returncode != 0:
        raise ProgramFailed(f"{program.prefix} exited {proc.returncode}: {last or '(no message)'}")
    m = _line_re(program.prefix).match(last)
    if not m:
        raise ProgramFailed(f"{program.prefix}: no timing line on stderr (last line: {last[:200]!r})")
    try:
        ids = [int(x) for x in proc.stdout.split()]
    except ValueError:
        raise ProgramFailed(f"{program.prefix} --ids printed something other than ids: {proc.stdout[:200]!r}") from None
    return Generation(ids, float(m.group(3)), int(m.group(4)), float(m.group(5)))


def program_row(name: str, artifact, tokenizer_bin, prompt: str, n_tokens: int, repeats: int,
                references: dict[str, list[int]], agreement) -> dict:
    """The row of program `name` on `artifact`: decode tok/s (median of `repeats` runs of
    `n_tokens`), and agreement (`loops.agreement`) of one run as long as the references with
    each of them ({"eager": ids, "native": ids}, same length); `available: false` and the reason
    if it is not built or fails."""
    program = PROGRAMS[name]
    row: dict = {"kind": "program", "best_loop": program.label}
    try:
        argv = resolve(program.argv)()
        runs = [generate(program, argv, artifact, tokenizer_bin, prompt, n_tokens) for _ in range(repeats)]
        long = generate(program, argv, artifact, tokenizer_bin, prompt, len(next(iter(references.values()))))
    except (ProgramMissing, ProgramFailed) as e:
        print(f"[benchmark] {name}: not measured: {e}", flush=True)
        return {**row, "available": False, "reason": str(e)}
    rate = statistics.median(r.tok_s for r in runs)
    command = " ".join([*(Path(a).name for a in argv), *program.flags])
    row.update({"available": True, "command": command, "decode_tok_s_best_loop": rate,
                "decode_tok_s_1thread": rate, "decode_tokens": n_tokens, "prompt_tokens": runs[0].prompt_tokens,
                "prefill_ms_prompt": statistics.median(r.prefill_ms for r in runs),
                "size_bytes": Path(artifact).stat().st_size, "size_kind": "file", "generated_tokens": len(long.ids)})
    for against, ids in references.items():
        row.update(agreement(long.ids, ids, against))
    print(f"[benchmark] {name}: {rate:.0f} tok/s, agreement {row['greedy_agreement_with_eager']}", flush=True)
    return row


# valgrind (3.19) has no AVX-512: under it the C step would fall back to AVX2 by itself; the count
# names the code path it ran, forced here so it does not depend on that fallback
CALLGRIND_ISA = "avx2"


def callgrind_ir(argv: list[str], extra: list[str]) -> int:
    """Instructions executed (callgrind's Ir total) by one run of argv + extra, on the AVX2 path."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", *argv, *extra]
        env = {**os.environ, "ITERALITE_NATIVE_ISA": CALLGRIND_ISA}
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S, env=env)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not m:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise ProgramFailed(f"callgrind run failed (exit {proc.returncode}): {tail[0][:200]}")
    return int(m.group(1))


def instructions_per_token(artifact, tokenizer_bin, prompt: str, n1: int, n2: int, program: str = "itl_run") -> dict:
    """Instructions per decoded token of the program's greedy loop, counted by callgrind:
    (Ir(n2) - Ir(n1)) / (n2 - n1). Keys instructions_*; `instructions_available: false` and the
    reason when valgrind or the program is missing (or the count fails)."""
    spec = PROGRAMS[program]
    try:
        if shutil.which("valgrind") is None:
            raise ProgramMissing("valgrind is not installed")
        argv = resolve(spec.argv)()
        ir = {n: callgrind_ir(argv, [str(artifact), str(tokenizer_bin), "-p", prompt, "-n", str(n), "-t", "0", "--ids",
                                     *spec.flags]) for n in (n1, n2)}
        version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    except (ProgramMissing, ProgramFailed, OSError, subprocess.TimeoutExpired) as e:
        return {"instructions_available": False, "instructions_reason": str(e)}
    return {"instructions_per_token": round((ir[n2] - ir[n1]) / (n2 - n1), 1), "instructions_available": True,
            "instructions_tokens": [n1, n2], "instructions_tool": f"{version} --tool=callgrind (Ir)",
            "instructions_isa": CALLGRIND_ISA,
            "instructions_program": spec.prefix}
