"""Pin this machine's 3-epoch histories: every preset on every engine, seed 0.

Run on a machine without a pin (the test warns there), or when a change is meant to move
the numbers (then say so in the commit, and drop the pins of machines you cannot rerun):
    .venv/bin/python tests/golden/make_histories.py
Other machines' pins are kept.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_runs import GOLDEN_FILE, golden_cases, machine, read_pins, run_case  # noqa: E402

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from bnlab.data import load_mnist

    data = load_mnist()
    histories = {}
    for engine, preset in golden_cases():
        histories[f"{engine}/{preset}"] = run_case(engine, preset, data)
        print(engine, preset, histories[f"{engine}/{preset}"][-1])
    here = machine()
    pins = [pin for pin in read_pins() if pin["machine"] != here] + [{"machine": here, "histories": histories}]
    document = json.loads(GOLDEN_FILE.read_text())
    document["pins"] = pins
    temporary = GOLDEN_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    temporary.replace(GOLDEN_FILE)
    print(f"pinned for {here}; {len(pins)} pin(s) in {GOLDEN_FILE}")
