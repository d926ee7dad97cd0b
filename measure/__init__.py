"""What the benchmark scripts measure: timing and FLOP counting, and the workloads they time (real-size networks
with random weights, the released sampling step re-enacted)."""
