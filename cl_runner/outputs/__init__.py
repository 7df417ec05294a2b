"""What a run leaves for people: the result files and the console table (results), per-example predictions
(predictions), plots, the cost columns (cost), runs read back from disk (jobs), cl-report's table (report), the
paper comparison (reproduction) and the sweep summary (sweep).

May import: core, config.schema and scoring.cl_metrics; never the engine (the engine calls outputs)."""
