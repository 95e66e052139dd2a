"""Regenerate histories_3_epochs.json: every preset on every engine, 3 epochs, seed 0.

Run only when a change is meant to move the numbers (and say so in the commit):
    .venv/bin/python tests/golden/make_histories.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_runs import GOLDEN_FILE, golden_cases, run_case  # noqa: E402

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from bnlab.data import load_mnist

    data = load_mnist()
    out = {}
    for engine, preset in golden_cases():
        out[f"{engine}/{preset}"] = run_case(engine, preset, data)
        print(engine, preset, out[f"{engine}/{preset}"][-1])
    GOLDEN_FILE.write_text(json.dumps(out, indent=1) + "\n")
