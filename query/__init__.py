"""Statements across the cluster: `query.coordinator.Coordinator` runs one statement —
DDL, a read or a write — against a `query.port.ClusterPort`, and returns what single-node
DuckDB returns for it. The client process is every statement's coordinator: it gathers the
rows a statement reads at one read barrier, runs the statement in its own DuckDB, and
commits only the rows that changed, in one command of the cluster log.

Modules: `port` (the cluster as the coordinator sees it), `coordinator` (dispatch, DDL,
retries, results), `_reads` (what a statement reads, the work database, errors), `_writes`
(targets, diffs, partition split, staging). The planner tiers of DESIGN §5 (routing,
push-down, two-phase aggregation) are not here yet: every read is the gather fallback."""
