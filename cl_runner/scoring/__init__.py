"""How well the model does: scoring one task (evaluate: generation, label scoring, perplexity), scoring the whole
sequence after each task with its schedule and progress (sequence), monitor tasks that are never trained on
(monitors), and the continual-learning metrics computed from the score matrix (cl_metrics: pure, no torch).
The task metrics are registered objects (metrics), scored per example by pure string functions (answers: how an
answer is read; text_metrics: ROUGE-L, BLEU, token F1, edit similarity; sari).

May import: core, config.schema, models, tasks, strategies (the strategy's evaluation hooks). metrics, answers,
text_metrics and sari are leaves (standard library only), which config.schema, tasks and outputs import to find a
metric."""
