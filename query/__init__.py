"""The distributed query planner: parse, plan and merge queries across partitions.
Arrives with the planner issue."""
