"""A bounded, seeded mutation fuzzer's harness: each case draws its mutation from its own
`random.Random(f"{name}:{seed}:{index}")`, runs under a CPU-time budget, and every failure is reported
with its fuzzer, seed, index, mutation and exception, so it can be replayed alone
(ITERALITE_FUZZ_CASE=<index> runs only that case, with the full traceback)."""
from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import time
import traceback
from contextlib import contextmanager

# One case (one parse of a small input) takes milliseconds of CPU; the slowest, a params value in
# brackets 5,000 deep, about 1 s. The budget counts this process's CPU time, not the wall clock: in
# `make test` three workers share two cores beside `dvc repro` chains, and a 1-s case measured past
# 5 s of wall time there (CI, stop 36) while its CPU time stayed the same.
CASE_BUDGET_S = 5.0
HARD_LIMIT_S = 120.0  # wall clock: a hang that burns no CPU (a blocked read) or that the signal cannot interrupt


class CaseTimeout(BaseException):
    """A case ran past its budget (BaseException: the code under test's `except Exception` must
    not turn it into a clean error)."""


class Failure(AssertionError):
    """A case's outcome broke the fuzzer's property (raised by a check, with the reason)."""


@contextmanager
def time_budget(seconds: float):
    """CaseTimeout once the block has used `seconds` of this process's CPU time (SIGPROF from
    ITIMER_PROF: user + system time of all its threads); the wall-clock HARD_LIMIT_S behind it."""
    def on_alarm(signum, frame):
        raise CaseTimeout(f"ran past its {seconds:g} s CPU budget")

    old = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    faulthandler.dump_traceback_later(HARD_LIMIT_S, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        faulthandler.cancel_dump_traceback_later()


def one_line(e: BaseException) -> bool:
    msg = str(e)
    return bool(msg) and "\n" not in msg


def run_cases(name: str, seed: int, n: int, case, budget_s: float = CASE_BUDGET_S) -> list[str]:
    """Run `case(rng, describe)` for n indices; `describe(text)` records the case's mutation.
    -> one line per failing case: a Failure, a CaseTimeout, or any other exception escaping it."""
    only = os.environ.get("ITERALITE_FUZZ_CASE")
    failures = []
    for i in range(n):
        if only is not None and str(i) != only:
            continue
        rng = random.Random(f"{name}:{seed}:{i}")
        what: list[str] = []
        t0 = time.process_time()
        try:
            with time_budget(budget_s):
                case(rng, what.append)
        except (Failure, CaseTimeout, Exception) as e:
            if only is not None:
                traceback.print_exc()
            kind = "property" if isinstance(e, Failure) else type(e).__name__
            msg = " ".join(str(e).split())[:300]
            failures.append(f"{name} seed={seed} case={i} mutation={'; '.join(what)[:300]} -> {kind}: {msg}")
            continue
        used = time.process_time() - t0
        if used > budget_s:
            failures.append(f"{name} seed={seed} case={i} mutation={'; '.join(what)[:300]} -> "
                            f"took {used:.2f} s of CPU > {budget_s:g} s")
    return failures


def report(failures: list[str], n: int) -> str:
    head = f"{len(failures)} of {n} cases failed (replay one: ITERALITE_FUZZ_CASE=<case> pytest -k <test>):"
    return "\n".join([head, *failures[:12]] + ([f"... and {len(failures) - 12} more"] if len(failures) > 12 else []))


# --------------------------------------------------------------------------- byte mutations

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, (1 << 63) - 1, (1 << 64) - 1)


def mutate_bytes(rng: random.Random, data: bytes, describe, hot: int | None = None,
                 keep_length: bool = False) -> bytes:
    """`data` after 1-4 random edits: bit flip, byte set, truncation, insertion, deletion, chunk
    duplication, an interesting little-endian integer written over 1-8 bytes. `hot`: edits land
    in the first `hot` bytes (a header) half the time. keep_length: in-place edits only."""
    buf = bytearray(data)
    ops = ("flip", "set", "int") if keep_length else ("flip", "set", "cut", "insert", "delete", "dup", "int")
    for _ in range(rng.randint(1, 4)):
        size = len(buf)
        span = hot if hot and rng.random() < 0.5 and hot <= size else size
        pos = rng.randrange(span) if span else 0
        op = rng.choice(ops)
        if op == "flip" and size:
            bit = rng.randrange(8)
            buf[pos] ^= 1 << bit
            describe(f"flip byte {pos} bit {bit}")
        elif op == "set" and size:
            v = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
            buf[pos] = v
            describe(f"set byte {pos}={v}")
        elif op == "cut":
            del buf[pos:]
            describe(f"truncate at {pos}")
        elif op == "insert":
            v = rng.randrange(256)
            buf[pos:pos] = bytes([v]) * rng.choice((1, 1, 4, 64))
            describe(f"insert {v} at {pos}")
        elif op == "delete" and size:
            k = rng.randint(1, 16)
            del buf[pos:pos + k]
            describe(f"delete {k} at {pos}")
        elif op == "dup" and size:
            k = rng.randint(1, 32)
            buf[pos:pos] = buf[pos:pos + k]
            describe(f"duplicate {k} at {pos}")
        elif op == "int" and size:
            width = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[pos:pos + width] = v.to_bytes(width, "little")[:size - pos]
            describe(f"write {v} ({width} bytes) at {pos}")
    return bytes(buf)
