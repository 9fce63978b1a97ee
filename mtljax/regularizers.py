"""Multi-task regularizers: pure functions of stacked task weights, with proximal operators.

Block sparsity across tasks (:func:`l1_l2`, :func:`l1_linf` and their proximal operators), low
rank (:func:`trace_norm`, :func:`prox_trace_norm`), mean-regularized MTL
(:func:`mean_regularized`), task clustering at a given or alternated assignment
(:func:`task_clustering`, :func:`assign_clusters`) or learned by the convex relaxation
(:func:`task_clustering_convex`, :func:`cluster_covariance`)
and the matrix-variate normal task-relationship prior (:func:`task_relationship_penalty`,
:func:`update_task_covariance`); :func:`prox_on` applies a proximal operator to selected
parameters after each train step (``make_train_step(..., prox=...)``).
"""

from mtljax._src.regularizers import (
    assign_clusters,
    cluster_covariance,
    group_norms,
    l1_l2,
    l1_linf,
    mean_regularized,
    project_l1_ball,
    prox_l1_l2,
    prox_l1_linf,
    prox_on,
    prox_trace_norm,
    task_clustering,
    task_clustering_convex,
    task_relationship_penalty,
    trace_norm,
    update_task_covariance,
)

__all__ = [
    "assign_clusters",
    "cluster_covariance",
    "group_norms",
    "l1_l2",
    "l1_linf",
    "mean_regularized",
    "project_l1_ball",
    "prox_l1_l2",
    "prox_l1_linf",
    "prox_on",
    "prox_trace_norm",
    "task_clustering",
    "task_clustering_convex",
    "task_relationship_penalty",
    "trace_norm",
    "update_task_covariance",
]
