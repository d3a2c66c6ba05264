"""``nemotron-fast bench``: the command-line face of the benchmark runner in ``benchmarks/`` (a source checkout).

The arguments live here so ``nemotron-fast bench --help`` works from the installed package; the runner itself
(``benchmarks.run``, also ``python -m benchmarks.run``) ships with the repository, next to the pytest-benchmark
suites, and is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_bench_parser", "add_bench_arguments", "load_dispatch", "PRESETS"]

PRESETS = ("full", "quick", "issue6", "modes")

_EPILOG = """presets:
  full    the whole matrix: every model (demo model when installed; Tekken-vocab checkpoints at three widths),
          prompts text / one image / >= 1000 prefix tokens, max_tokens 128 and 512, block_length 16 and 32,
          threshold 0.9 and None; reference, fast, opt-in policies, batches 1/4/16 (hours on a small CPU)
  quick   a subset that finishes in minutes on a 2-core CPU (--quick)
  issue6  issue 6's CPU acceptance benchmark: Tekken-vocab VLM, >= 1000 image+text prompt tokens, 512 new
          tokens, threshold 0.9, 256 steps, block 32; fast vs reference
  modes   the three decoding modes of the same weights (diffusion, ar, linear_spec) on the demo model (or
          --demo-model): parity with each mode's reference first, then tokens/s and tokens per forward
Every list option below overrides the preset's value. The last stdout line is one JSON document."""


def _csv(kind: type) -> object:
    """argparse type: a comma-separated list of ``kind`` (``none`` maps to None for thresholds)."""

    def parse(text: str) -> list:
        out: list = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            out.append(None if item.lower() == "none" else kind(item))
        return out

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Register the runner's options on ``p`` (shared by ``nemotron-fast bench`` and ``python -m benchmarks.run``)."""
    p.add_argument("--preset", choices=PRESETS, default="full", help="which matrix to run (default: full)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--out", type=Path, default=None, help="output directory for the plot and results.json "
                   "(default: benchmarks/results/latest-<preset>)")
    p.add_argument("--models", type=_csv(str), default=None,
                   help="comma list of model names (demo, tekken-h64, tekken-h192, tekken-h384, small-h64)")
    p.add_argument("--prompts", type=_csv(str), default=None, help="comma list of: text, image, long")
    p.add_argument("--max-tokens", type=_csv(int), default=None, help="comma list, e.g. 128,512")
    p.add_argument("--block-lengths", type=_csv(int), default=None, help="comma list, e.g. 16,32")
    p.add_argument("--thresholds", type=_csv(float), default=None, help="comma list, e.g. 0.9,none")
    p.add_argument("--steps", type=int, default=None,
                   help="total denoise steps (default: the endpoint rule, 256 rounded up to the block count)")
    p.add_argument("--policies", type=_csv(str), default=None,
                   help="comma list of opt-in policies to time as separate samplers (exclude_mask, "
                        "finish_last_step, exclude_mask+finish_last_step); empty string for none")
    p.add_argument("--batches", type=_csv(int), default=None, help="batch sizes for fast throughput rows")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per contender (warm-up excluded)")
    p.add_argument("--eval-n", type=int, default=None, help="demo eval scenes for the accuracy column")
    p.add_argument("--demo-model", type=Path, default=None,
                   help="checkpoint used as the demo model (default: the installed one, when present)")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="where generated Tekken-vocab checkpoints are cached (default: ~/.cache/nemotron_fast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads, or 'auto' (default): torch's own choice, but 1 on a CPU that is "
                        "already busy (1-minute load average >= half the cores), where threads waiting for each "
                        "other at every op would measure the scheduler instead of the samplers")
    p.add_argument("--history", type=Path, default=None,
                   help="JSONL file the run is appended to (default: benchmarks/results/history.jsonl)")
    p.add_argument("--no-history", action="store_true", help="do not append to the history file")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--write-readme-table", nargs="?", type=Path, const=True, default=None, metavar="PATH",
                   help="write the Markdown results table (default path: benchmarks/README_TABLE.md)")
    load = p.add_argument_group("load benchmark (--serve, benchmarks/load.py)",
                                "a seeded open-loop client with Poisson arrivals against `nemotron-fast serve`, "
                                "static vs continuous batching; also uses --models (default demo,tekken-h64), "
                                "--max-tokens, --block-lengths, --thresholds, --device, --threads, --out, "
                                "--no-plot, --history, --demo-model, --ckpt-dir")
    load.add_argument("--serve", action="store_true",
                      help="run the load benchmark against a server instead of the sampler matrix")
    load.add_argument("--rates", type=_csv(float), default=None,
                      help="comma list of offered loads in requests/s (default: 2,8,32)")
    load.add_argument("--requests", type=int, default=None, help="requests per rate (default: 64)")
    load.add_argument("--distinct", type=int, default=None,
                      help="distinct requests the arrivals draw from, each checked against Pipeline.run (default: 24)")
    load.add_argument("--seed", type=int, default=None, help="seed of the requests and arrival times (default: 0)")
    load.add_argument("--batching", type=_csv(str), default=None,
                      help="comma list of server batching modes: static, continuous (default: both)")
    load.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: 16)")
    load.add_argument("--clients", type=int, default=None,
                      help="concurrent clients at which the continuous/static goal is judged (default: 16)")
    load.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="model dtype of the server and of the expected answers (default: float32)")


# options of the load benchmark only (refused without --serve)
_LOAD_ONLY = ("rates", "requests", "distinct", "seed", "batching", "max_batch", "clients", "dtype")


def _repo_root() -> Path | None:
    """The source checkout holding ``benchmarks/run.py`` next to this package, if there is one."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "run.py").is_file() else None


def load_dispatch(args: argparse.Namespace) -> int | None:
    """With ``--serve``: run the load benchmark (``benchmarks.load``) and return its exit status; 2 (with an
    error) for load-benchmark options without ``--serve``; None when the sampler benchmark should run."""
    if getattr(args, "serve", False):
        import benchmarks.load as load

        return load.run_from_bench_args(args)
    given = [f"--{k.replace('_', '-')}" for k in _LOAD_ONLY if getattr(args, k, None) is not None]
    if given:
        print(f"error: {', '.join(given)} belong to the load benchmark (add --serve)", file=sys.stderr)
        return 2
    return None


def _run(args: argparse.Namespace) -> int:
    root = _repo_root()
    if root is None:
        print("error: the benchmark runner ships with the source repository (benchmarks/run.py); run "
              "`nemotron-fast bench` from a checkout installed with `pip install -e .[bench]`", file=sys.stderr)
        return 2
    # the checkout first: an unrelated top-level ``benchmarks`` package elsewhere on the path must not win
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    status = load_dispatch(args)
    if status is not None:
        return status
    if args.preset == "modes" and not args.quick:
        import benchmarks.modes as modes

        return modes.run_from_bench_args(args)
    import benchmarks.run as runner

    return runner.run(args)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to the CLI's ``subparsers``; its ``func`` runs the benchmark."""
    p = subparsers.add_parser("bench", help="speed/parity/accuracy benchmark (fast vs reference sampler)",
                              description="Benchmark the fast sampler against the reference in one process: "
                                          "parity first, then tokens/s, tokens per forward, NFE per block, "
                                          "time split, peak memory, accuracy and the distance to the floor.",
                              epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.set_defaults(func=_run)
    return p
