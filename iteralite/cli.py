"""`iteralite` command line: generate text from any artifact, or evaluate one."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iteralite.io.errors import IteraliteError


def _load(args):
    from iteralite.io.checkpoint import load_model
    from iteralite.data.tokenizer import file_sha256, load_tokenizer

    model, ckpt = load_model(args.checkpoint)
    tok = load_tokenizer(args.tokenizer)
    if ckpt.tokenizer_sha256 and ckpt.tokenizer_sha256 != file_sha256(args.tokenizer):
        raise IteraliteError(f"{args.checkpoint} was trained with another tokenizer than {args.tokenizer} "
                             "(sha256 differs); pass the matching --tokenizer")
    return _runtime(model, ckpt, args), ckpt, tok


def _runtime(model, ckpt, args):
    """The fuse stage's artifact runs through the fused model: eager fused ops by default, or
    compiled (step + this prompt's prefill) with --compile."""
    if ckpt.kind != "fused":
        return model
    from iteralite.runtime.deploy import fuse
    from iteralite.data.tokenizer import load_tokenizer

    if not getattr(args, "compile", False):
        return fuse(model, "eager")
    n = len(load_tokenizer(args.tokenizer).encode(args.prompt, add_special_tokens=False).ids) or 1
    return fuse(model, ckpt.meta.get("runtime", {}).get("backend", "aoti"), [n])


def cmd_generate(args) -> None:
    import torch

    from iteralite.train.generate import stream_text

    if args.max_new_tokens < 0:
        raise IteraliteError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise IteraliteError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt, tok = _load(args)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream_text(tok, model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, write)
    sys.stdout.write("\n")


def cmd_evaluate(args) -> None:
    from iteralite.train.evaluate import EvalConfig, Evaluator

    model, ckpt, _ = _load(args)
    ev = Evaluator(EvalConfig(max_tokens=args.max_tokens), Path(args.tokenizer).parent)
    print(json.dumps({"checkpoint": str(args.checkpoint), "kind": ckpt.kind, **ev(model)}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="iteralite", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream a story from a checkpoint (any artifact kind)")
    g.add_argument("--checkpoint", default="checkpoints/fp32.safetensors")
    g.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    g.add_argument("--prompt", default="Once upon a time")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = no top-k filter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="0 = torch default")
    g.add_argument("--compile", action="store_true",
                   help="fused artifacts: compile the step and this prompt's prefill first (~40 s), then decode fast")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("evaluate", help="validation ppl/bpb and WikiText-2 ppl of a checkpoint")
    e.add_argument("--checkpoint", default="checkpoints/fp32.safetensors")
    e.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    e.add_argument("--max-tokens", type=int, default=0)
    e.set_defaults(func=cmd_evaluate)
    args = p.parse_args(argv)
    try:
        args.func(args)
    except IteraliteError as e:
        print(f"iteralite: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
