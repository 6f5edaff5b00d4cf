"""Progressive delivery: step a canary's weight by its own metrics, roll back on breach.

`machine` is the pure state machine (events in, state out); `analysis` turns metric
snapshots into an interval's observation. The sidecar owns the clock and the I/O.
"""
