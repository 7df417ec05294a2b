"""What a run is asked to do, checked before anything loads: the typed schemas (schema: one dataclass per config
group, each with its own range checks), the Hydra search path and the composition that the CLI runs once
(preflight), per-task strategy overrides (task_overrides) and ``cl-run --help`` (help).

May import: core, trackers.schema, strategies.registry, strategies.support, scoring.metrics and scoring.answers
(the registry and the strategies' declared support type and check the chosen strategy's options; the two scoring
leaves name a task's metric and how its answers are read).
``config.schema`` itself is imported by the layers above core (models, tasks, scoring, outputs, engine)."""
