"""One grid report over the two invocations of the reduced study (batch 1000: 100 epochs,
seeds 0-2; batch 100: 30 epochs, seeds 0-1)."""
import sys
from bnlab.grid import parse_axis
from bnlab.grid_report import build_grid_report
from bnlab.study import repaired_results
from bnlab.sweep import finished_outcome, plan_sweep

b100 = sys.argv[1]
momenta = parse_axis("model.bn_momentum=0.5,0.1,0.01")
specs, outs, extra = [], [], []
for out, batch, epochs, seeds in (("/tmp/study/b1000", 1000, 100, [0, 1, 2]), (b100, 100, int(sys.argv[2]), [0, 1])):
    s = plan_sweep(["question", "answer"], seeds, out, {"epochs": epochs, "threads": 1},
                   grid=[momenta, parse_axis(f"train.batch_size={batch}")])
    o = [finished_outcome(x) for x in s]
    assert all(x is not None for x in o)
    specs += s; outs += o; extra += repaired_results(s, o, out)
axes = [momenta, parse_axis("train.batch_size=100,1000")]
r = build_grid_report(specs, outs, axes, "/tmp/study/combined/report", extra=extra,
                      title=f"bnlab study sharing (reduced: batch 1000 x 100 epochs x seeds 0-2, batch 100 x {sys.argv[2]} epochs x seeds 0-1)")
print(r.stats_table())
print(r.html)
