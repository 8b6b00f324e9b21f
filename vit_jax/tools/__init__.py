"""The user-facing modes besides training: evaluate, predict, visualize, export, bench
(with flops: FLOP counts and device peaks)."""
