"""``nemotron-fast`` command line: ``generate`` (one request, the endpoint's schema) and, when installed,
``serve`` (the fal-compatible server) and ``bench`` (the benchmark runner)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import NemotronFastError
from .sampling import MODES

__all__ = ["main", "build_parser"]


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="answer a prompt about an image", description="Run one request.")
    g.add_argument("--image", required=True,
                   help="local path, http(s) URL or data: URI (the command line reads any path or address it is "
                        "given; the library's Pipeline.run and the server refuse local and private ones)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: 256 rounded up)")
    g.add_argument("--block-length", type=int, default=None)
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--sampler", choices=("fast", "reference"), default="fast")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="decoding mode of the same weights (default: diffusion, the endpoint's)")
    g.add_argument("--thinking", action="store_true",
                   help="let the model think first (the prompt ends with <think> instead of <think></think>)")
    g.add_argument("--max-image-size", type=int, default=None,
                   help="cap on the image's longest side in pixels before preprocessing (default: 1400)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    g.add_argument("--json", action="store_true", help="print the endpoint's output JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemotron-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    try:
        from .server.cli import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    try:
        from .bench import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return p


def _generate(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    inputs: dict = {"image_url": args.image, "prompt": args.prompt}
    for key, val in (("max_tokens", args.max_tokens), ("num_inference_steps", args.steps),
                     ("block_length", args.block_length), ("threshold", args.threshold), ("mode", args.mode)):
        if val is not None:
            inputs[key] = val
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, sampler=args.sampler,
                                    enable_thinking=args.thinking, max_image_size=args.max_image_size)
    # the image comes from the person running the command: their files and their network are theirs to use
    out = pipe.run(inputs, allow_private_urls=True, allow_local_files=True)
    if args.json:
        print(json.dumps(out))
        return 0
    u, t = out["usage"], out["timings"]
    print(out["output"])
    tpf = u["completion_tokens"] / max(u["num_function_evals"], 1)
    print(f"[{args.sampler}, {args.mode or 'diffusion'}] prompt {u['prompt_tokens']} tok, "
          f"completion {u['completion_tokens']} tok, "
          f"{u['num_function_evals']} forwards ({tpf:.2f} tok/forward); total {t['total_time']:.2f}s, "
          f"generation {t['generation_time']:.2f}s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        return int(args.func(args) or 0)
    except NemotronFastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
