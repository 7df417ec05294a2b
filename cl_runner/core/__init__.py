"""The leaves every other part may import, and that import nothing of cl_runner's own but each other: one-line
user errors (errors), deferred heavy imports (lazy), quiet loggers (logs), option checks shared by every schema
(checks), the process group and its collectives (dist), atomic file writes and disk-full detection (files),
RNG capture (rng) and whole-table console printing (console).

May import: nothing outside core (the leaves of the import graph)."""
