"""Pruning: `core` holds the mechanics (structured head/FFN removal, KD recovery, unstructured sparsity); `pruned`
and `sparse` are the registered techniques."""
