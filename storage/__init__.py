"""Durable state: the Raft WAL (implementing raft.LogStorage), catalog, partitions,
staging and snapshots. Arrives with the cluster runtime and partitioned-tables issues."""
