"""Where device time goes: a summary of a jax.profiler trace.

The benchmarks take `--profile DIR`, which records a few timed steps with
`jax.profiler.trace(DIR, create_perfetto_trace=True)`. This script reads the
perfetto JSON of the newest run under DIR and prints, for the device tracks
(`/device:GPU:0`, `/device:TPU:0`, ...), the time per kernel class (matmul
libraries, fused attention, Pallas/Triton kernels, XLA fusions, copies,
collectives) and the top kernels, with the busy fraction of the traced span:
the gap between the benchmark's MFU and 100% is this table.

    python bench/profile_summary.py DIR [--top 25] [--json out.json]

`--host` summarises the host tracks instead (CPU runs: tests, smoke).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# First match wins; names are CUDA kernel or TPU op names as XLA emits them.
CLASSES = (
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|"
                   r"collective-permute"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("attention (cuDNN/flash)", r"cudnn|fmha|flash|dot_product_attention"),
    ("matmul library", r"gemm|cutlass|nvjet|xmma|cublas|sm90_|convolution"),
    ("pallas/triton kernel", r"local_attention|linear_attention|"
                             r"selective_scan|pallas|triton"),
    ("xla fusion", r"fusion|loop_|input_|reduce|wrapped_|ynn_"),
)


def classify(name: str) -> str:
  lowered = name.lower()
  for label, pattern in CLASSES:
    if re.search(pattern, lowered):
      return label
  return "other"


def newest_trace(path: str | pathlib.Path) -> pathlib.Path:
  """The newest *.trace.json.gz under `path` (or `path` itself)."""
  path = pathlib.Path(path)
  if path.is_file():
    return path
  traces = sorted(path.glob("**/*.trace.json.gz"),
                  key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no *.trace.json.gz under {path}: record one "
                            f"with jax.profiler.trace(dir, "
                            f"create_perfetto_trace=True)")
  return traces[-1]


def summarize(path, host: bool = False) -> dict:
  """Per-class and per-kernel device time of the newest trace under path."""
  with gzip.open(newest_trace(path), "rt") as f:
    events = json.load(f)["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  want = (lambda n: n.startswith("/host")) if host else (
      lambda n: n.startswith("/device"))
  pids = {pid for pid, name in procs.items() if want(name)}
  if not pids:
    raise ValueError(f"trace has no {'host' if host else 'device'} tracks; "
                     f"processes: {sorted(procs.values())}")
  by_kernel = collections.Counter()
  count = collections.Counter()
  start, end = float("inf"), 0.0
  for e in events:
    if e.get("ph") != "X" or e["pid"] not in pids:
      continue
    dur = float(e.get("dur", 0.0))
    by_kernel[e["name"]] += dur
    count[e["name"]] += 1
    start, end = min(start, e["ts"]), max(end, e["ts"] + dur)
  by_class = collections.Counter()
  for name, dur in by_kernel.items():
    by_class[classify(name)] += dur
  busy = sum(by_kernel.values())
  return {"span_us": max(end - start, 0.0), "busy_us": busy,
          "classes": by_class.most_common(),
          "kernels": [(n, d, count[n]) for n, d in by_kernel.most_common()]}


def render(summary: dict, top: int) -> str:
  busy = summary["busy_us"] or 1.0
  lines = [f"traced span {summary['span_us'] / 1e3:.2f} ms, kernel time "
           f"{summary['busy_us'] / 1e3:.2f} ms (summed over streams)", "",
           "| class | ms | share |", "|---|---|---|"]
  for label, dur in summary["classes"]:
    lines.append(f"| {label} | {dur / 1e3:.2f} | {dur / busy:.1%} |")
  lines += ["", "| kernel | class | calls | ms | share |",
            "|---|---|---|---|---|"]
  for name, dur, calls in summary["kernels"][:top]:
    short = name if len(name) < 80 else name[:77] + "..."
    lines.append(f"| {short} | {classify(name)} | {calls} | {dur / 1e3:.2f} "
                 f"| {dur / busy:.1%} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("trace", help="profile dir (or a .trace.json.gz)")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--host", action="store_true",
                 help="summarise host tracks (CPU runs)")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args()
  summary = summarize(args.trace, host=args.host)
  print(render(summary, args.top))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
