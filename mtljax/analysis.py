"""Task relations: gradient conflicts, inter-task affinity, task groupings, negative transfer.

See :mod:`mtljax._src.analysis` for the definitions and references.
"""

from mtljax._src.analysis import (
    AffinityRun,
    Grouping,
    conflict_stats,
    gradient_stats,
    group_scores,
    lookahead_affinity,
    magnitude_similarity,
    negative_transfer,
    suggest_groups,
    summarize_conflicts,
    train_with_affinity,
)

__all__ = [
    "AffinityRun",
    "Grouping",
    "conflict_stats",
    "gradient_stats",
    "group_scores",
    "lookahead_affinity",
    "magnitude_similarity",
    "negative_transfer",
    "suggest_groups",
    "summarize_conflicts",
    "train_with_affinity",
]
