"""The run driver: assembly, resume and the task sequence (run), the train-one-task loop (loop), checkpoints on
disk (checkpoint) and the run's resumable state (run_state), device, precision, seeding, lock and signals
(runtime), CPU threads (threads), DDP/FSDP wrapping (parallel) and the FLOPs accounting (flops).

May import: core, config, models, tasks, strategies, scoring, outputs and trackers (every layer below it)."""
