"""IMP from Python on MNIST-1D (small: 4 levels, 2 rewind steps, 2 seeds; about a minute of CPU).

    python examples/imp_python.py [OUT]

Runs IMP with weight rewinding (Algorithm 1 of the paper) from the `mnist1d` preset with fewer
levels and steps, prints test error against weights remaining, reads a level back from the run
folder and writes the report (figures + Markdown).
"""
import sys

import torch

from fastimp import imp, presets
from fastimp.report import write_report

out = sys.argv[1] if len(sys.argv) > 1 else "imp_example_out"

config = presets.get("mnist1d")                      # an IMPConfig (see fastimp.imp.IMPConfig)
config = config.with_overrides([
    "levels=4",                                      # 4 pruning rounds of 20%: 41% left at the end
    "replicates=2",                                  # matching's eps: std of the dense replicates
    "train.steps=400", "train.milestones=[200,300]",
    "rewind_steps=0,40",                             # two rewind steps tau
])
run = imp.run(config, out)                           # resumable: rerunning skips finished levels

print(f"run folder: {run.dir}")
for row in run.summary():
    print(f"rewind step {row['rewind_step']:>3}  level {row['level']}  "
          f"weights remaining {100 * row['weights_remaining']:6.2f}%  "
          f"test error {100 * row['test_error']:5.2f}%  matching {row['matching']}")

# Everything a level produced is in the folder: its mask, its solution and its statistics.
level = run.levels()[-1]
masks = run.mask(level)                              # fastimp.Masks: m^(L)
model = run.build_model()
model.load_state_dict(run.solution(level))           # w^(L)
x, y = next(iter(run.test_data(batch_size=1000)))
with torch.no_grad():
    error = (model(x).argmax(1) != y).float().mean().item()
print(f"level {level} (replicate 0): {masks.remaining()} of {masks.total()} prunable weights, "
      f"test error {100 * error:.2f}%, ||w - m.w|| of its pruning step "
      f"{run.stats(level)['projection_distance']:.3f}")

print(f"report: {write_report(run.dir)}")
