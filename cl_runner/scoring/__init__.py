"""How well the model does: scoring one task (evaluate: generation, label scoring, perplexity), scoring the whole
sequence after each task with its schedule and progress (sequence), monitor tasks that are never trained on
(monitors), and the continual-learning metrics computed from the score matrix (cl_metrics: pure, no torch).

May import: core, config.schema, models, tasks, strategies (the strategy's evaluation hooks)."""
