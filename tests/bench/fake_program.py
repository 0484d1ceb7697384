"""A stand-in for itl-run / the wasm runner, speaking their command-line contract: prints the ids
listed in the file $FAKE_IDS (the first -n of them) and the timing line with prefix $FAKE_PREFIX;
$FAKE_FAIL set: exits 2 with the contract's error line."""
import os
import sys


def main(argv: list[str]) -> int:
    prefix = os.environ.get("FAKE_PREFIX", "itl-run")
    if os.environ.get("FAKE_FAIL"):
        print(f"{prefix}: error: {os.environ['FAKE_FAIL']}", file=sys.stderr)
        return 2
    n = int(argv[argv.index("-n") + 1])
    assert "--ids" in argv and argv[argv.index("-t") + 1] == "0", argv
    ids = open(os.environ["FAKE_IDS"]).read().split()[:n]
    print(" ".join(ids))
    print(f"{prefix}: {len(ids)} tokens in 2.5 ms, {1000 * len(ids) / 2.5:.1f} tok/s (prompt 4 tokens, 0.3 ms)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
