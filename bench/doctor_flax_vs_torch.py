"""Time ``bnlab doctor`` on the question's MLP in Flax (nnx) and in PyTorch, and JAX's share.

Each run is one fresh process (``python -m bnlab doctor FILE.py:MyModel --data mnist``:
the defaults, 60 training steps on a copy), alternating the two frameworks; the Flax
runs also report the seconds JAX spent compiling (jax.monitoring's backend-compile and
tracing/lowering events) and importing jax + flax.

    python bench/doctor_flax_vs_torch.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the child: the doctor as the CLI runs it, with JAX's compile events summed.
CHILD = """
import sys, time, json
start = time.perf_counter()
compile_s = [0.0]
if sys.argv[1] == "flax":
    import jax.monitoring
    def note(event, seconds, **kw):
        if event.startswith("/jax/core/compile/") or "jaxpr_to_mlir" in event or "trace" in event:
            compile_s[0] += seconds
    jax.monitoring.register_event_duration_secs_listener(note)
    t = time.perf_counter(); import jax, flax.nnx; imports = time.perf_counter() - t
else:
    t = time.perf_counter(); import torch; imports = time.perf_counter() - t
from bnlab.doctor.command import main
code = main([sys.argv[2], "--data", "mnist", "--json"])
print(json.dumps({"exit": code, "total": time.perf_counter() - start, "compile": compile_s[0], "import": imports}), file=sys.stderr)
"""


def run(framework: str, target: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, framework, target], cwd=ROOT, capture_output=True, text=True, check=False
    )
    import json

    return json.loads(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"torch": [], "flax": []}
    for _ in range(args.runs):
        for framework in ("torch", "flax"):
            results[framework].append(run(framework, f"examples/question_{framework}.py:MyModel"))
    for framework, runs in results.items():
        total = statistics.median(r["total"] for r in runs)
        line = f"{framework:6s} exit {runs[0]['exit']}  doctor {total:5.1f} s (median of {len(runs)})"
        line += f", importing {framework}: {statistics.median(r['import'] for r in runs):.1f} s"
        if framework == "flax":
            line += f", JAX compiling: {statistics.median(r['compile'] for r in runs):.1f} s"
        print(line, flush=True)
    print(time.strftime("%Y-%m-%d %H:%M"), "on", sys.platform)


if __name__ == "__main__":
    main()
