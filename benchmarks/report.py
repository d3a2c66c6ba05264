"""Results as data: the environment record, the printed table, the JSONL history, the plot, the README table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "format_table", "append_history", "write_plot", "readme_table", "REPO_ROOT",
           "RESULTS_DIR"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware, versions, git state, date and machine load: what a number needs to be quotable."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def hardware_line(env: dict[str, Any]) -> str:
    hw = env.get("gpu") or f"{env['cpu']} ({env['cores']} cores, torch threads {env.get('threads_choice')})"
    sha = (env.get("git_sha") or "unknown")[:10] + ("+dirty" if env.get("git_dirty") else "")
    return (f"{hw}; torch {env['torch']}, triton {env['triton']}; git {sha}; {env['date']}; "
            f"load average at start {env.get('loadavg_start')}")


def _f(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


_COLUMNS = [("model", "model", "s"), ("prompt", "prompt_tokens", "d"), ("max", "max_tokens", "d"),
            ("L", "block_length", "d"), ("thr", "threshold", "g"), ("sampler", "sampler", "s"),
            ("tok/s", "tokens_per_s", ".2f"), ("tok/fwd", "tokens_per_forward", ".2f"),
            ("NFE/blk", "nfe_per_block", ".1f"), ("vision", "t_vision", ".2f"), ("prefill", "t_prefill", ".2f"),
            ("denoise", "t_denoise", ".2f"), ("select", "t_select", ".2f"), ("commit", "t_commit", ".2f"),
            ("peak MiB", "peak_mem_mib", ".0f"), ("acc", "accuracy", ".3f"), ("x floor", "floor_ratio", ".1f"),
            ("speedup", "speedup_vs_reference", ".2f")]


def _cells(row: dict[str, Any]) -> list[str]:
    flat = dict(row)
    for k, v in (row.get("split_s") or {}).items():
        flat[f"t_{k}"] = v
    out = []
    for _, key, spec in _COLUMNS:
        v = flat.get(key)
        if key == "threshold" and v is None and "threshold" in flat:
            out.append("none")
        elif key == "prompt_tokens":
            out.append(f"{row['prompt']}:{v}")
        else:
            out.append(_f(v, spec))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows (time split in seconds of the median run)."""
    head = [c[0] for c in _COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(lines)


def append_history(path: Path, doc: dict[str, Any]) -> None:
    """Append one run (one JSON document per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(doc, sort_keys=True) + "\n")


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """tokens/s and accuracy against tokens per forward: colour = sampler, marker = model. The accuracy panel
    uses the tokens per forward measured on the eval scenes themselves. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install nemotron-fast[bench])", file=sys.stderr)
        return None
    samplers = sorted({r["sampler"] for r in rows})
    models = sorted({r["model"] for r in rows})
    colours = {s: f"C{i % 10}" for i, s in enumerate(samplers)}
    markers = {m: "osD^v<>ph*"[i % 10] for i, m in enumerate(models)}
    fig, (ax_speed, ax_acc) = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        style = dict(color=colours[r["sampler"]], marker=markers[r["model"]], alpha=0.8)
        ax_speed.scatter(r["tokens_per_forward"], r["tokens_per_s"], **style)
        if r.get("accuracy") is not None:
            ax_acc.scatter(r.get("accuracy_tokens_per_forward", r["tokens_per_forward"]), r["accuracy"], **style)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=s) for s, c in colours.items()]
    handles += [plt.Line2D([], [], color="gray", marker=m, linestyle="", label=k) for k, m in markers.items()]
    ax_speed.set(xlabel="tokens per forward", ylabel="completion tokens / s", yscale="log",
                 title="speed vs tokens per forward")
    ax_acc.set(xlabel="tokens per forward (on the eval scenes)", ylabel="demo eval accuracy (exact match)",
               ylim=(-0.02, 1.02), title="accuracy vs tokens per forward (demo model)")
    if not any(r.get("accuracy") is not None for r in rows):
        ax_acc.text(0.5, 0.5, "no demo-model rows in this run", ha="center", va="center",
                    transform=ax_acc.transAxes)
    for ax in (ax_speed, ax_acc):
        ax.grid(alpha=0.3)
    ax_speed.legend(handles=handles, fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def readme_table(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    """The Markdown section for the README: reference and fast rows (batch 1), with hardware and date."""
    sel = [r for r in rows if r["sampler"] in ("reference", "fast")]
    lines = [
        "<!-- generated by benchmarks/run.py --write-readme-table; do not edit by hand -->",
        "### Benchmark: reference vs fast sampler",
        "",
        f"Measured on {hardware_line(env)}.",
        "",
        "Completion tokens only; tokens/s is the median wall time over the timed rounds (warm-up excluded, "
        "samplers interleaved in one process). The fast rows passed the parity gate first: identical completion "
        "ids, NFE and reveal trace. `x floor` = measured time / time of the same run's matrix multiplies alone "
        "on this machine. Accuracy: exact-match answers on held-out demo scenes (demo model only). Tekken-vocab "
        "models have random weights, so they reveal about one token per forward.",
        "",
        "| model | params | prompt tokens | max_tokens | block | threshold | sampler | tokens/s | tokens/forward "
        "| NFE/block | accuracy | x floor | speedup |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sel:
        thr = "none" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['prompt']} ({r['prompt_tokens']}) | {r['max_tokens']} | "
            f"{r['block_length']} | {thr} | {r['sampler']} | {r['tokens_per_s']:.2f} | "
            f"{r['tokens_per_forward']:.2f} | {r['nfe_per_block']:.1f} | {_f(r.get('accuracy'), '.3f')} | "
            f"{_f(r.get('floor_ratio'), '.1f')} | {_f(r.get('speedup_vs_reference'), '.2f')} |")
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)
