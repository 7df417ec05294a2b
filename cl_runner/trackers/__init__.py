"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, CSV) fed by a run through their own clients.

``schema.py`` holds the ``logger`` config group's typed options (cheap to import: the root schema uses it);
``fanout.py`` opens the configured trackers on rank 0 and hands every call to each of them, so that a tracker
that fails costs one warning line and never the run; ``backends.py`` has one small class per tracker.

May import: core and outputs.plots (a tracker logs the run's figures); ``schema.py`` imports nothing of
cl_runner's own, since ``config.schema`` imports it."""
