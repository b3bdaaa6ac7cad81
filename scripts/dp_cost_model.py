#!/usr/bin/env python3
"""Expected speed-up of earshot's data-parallel training (issue #28) at 1-64 ranks.

A step on N ranks: each computes 1/N of the global batch (T_batch / N), then one ring
all-reduce of the trainable set's f32 gradients (2 (N-1)/N x bytes / bandwidth, plus
2 (N-1) message latencies), then the same AdamW update on every rank (T_update, not split).

    python3 scripts/dp_cost_model.py NAME SECONDS_PER_EXAMPLE GRADIENT_FLOATS [UPDATE_S]

prints, for a global batch of 64, the speed-up over one rank on 10 and 100 Gb/s links.
The step times come from what was measured (BENCHMARKS.md says where); the gradient sizes
from the shapes (projector and LoRA parameter counts).
"""
import sys

LATENCY_S = 20e-6  # per message on a datacentre network (TCP); InfiniBand is ~2 us
GLOBAL_BATCH = 64
RANKS = [1, 2, 4, 8, 16, 32, 64]


def step_time(n, per_example, floats, update_s, gbit):
    compute = GLOBAL_BATCH / n * per_example
    if n == 1:
        return compute + update_s
    bytes_ = floats * 4
    ring = 2 * (n - 1) / n * bytes_ / (gbit * 1e9 / 8) + 2 * (n - 1) * LATENCY_S
    return compute + ring + update_s


def main():
    if len(sys.argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    name, per_example, floats = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    update_s = float(sys.argv[4]) if len(sys.argv) == 5 else 0.0
    print(f"{name}: {per_example:g} s per example, {floats:,} gradient floats "
          f"({floats * 4 / 1e6:.2f} MB per all-reduce), update {update_s:g} s, "
          f"global batch {GLOBAL_BATCH}")
    print("| ranks | " + " | ".join(str(n) for n in RANKS) + " |")
    print("|---|" + "---|" * len(RANKS))
    for gbit in (10, 100):
        one = step_time(1, per_example, floats, update_s, gbit)
        cells = [f"{one / step_time(n, per_example, floats, update_s, gbit):.1f}x" for n in RANKS]
        print(f"| {gbit} Gb/s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
