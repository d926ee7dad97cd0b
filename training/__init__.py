"""What only training uses: the signals that stop a run, its checkpoints (what they hold, written durably, kept and
pruned, read back to resume) and its log (loss sums, log.csv, TensorBoard, sample grids)."""
