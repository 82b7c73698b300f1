"""Planning a run before launching it (`python -m pretrain.plan`): sizes, memory, checkpoints, shards."""
