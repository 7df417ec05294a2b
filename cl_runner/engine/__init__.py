"""The run driver. One entry point, run (run.py), for cl-run and tests alike; its parts, one module each: claiming
the run directory (claim), assembling model, tasks and strategy (assembly), where a run starts: afresh or from a
checkpoint (resume), the task loop of the sequence (sequence), the train-one-task loop (loop), when to checkpoint
(checkpoint_policy), checkpoints on disk (checkpoint; the distributed shards: checkpoint_dcp; how weights are
stored: weights), the run's resumable state (run_state), process group, device, precision, seeding, lock and
signals (runtime), CPU threads (threads), DDP/FSDP wrapping (parallel), the FLOPs accounting (flops)
and cl-run's own launcher of N worker processes (launch).

May import: core, config, models, tasks, strategies, scoring, outputs and trackers (every layer below it)."""
