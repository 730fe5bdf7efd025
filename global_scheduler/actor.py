"""The global scheduler as a Ray actor: one per cluster, named and detached, running
`ClusterControl` (global_scheduler/control.py)."""

from __future__ import annotations

import ray

from global_scheduler.control import ClusterControl

GLOBAL_SCHEDULER = "cacheopt-global-scheduler"
NAMESPACE = "cacheopt"

GlobalScheduler = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(ClusterControl)


def global_scheduler_handle(settings: dict):
    """The cluster's global scheduler, started if it is not running."""
    actor = GlobalScheduler.options(name=GLOBAL_SCHEDULER, namespace=NAMESPACE, lifetime="detached",
                                    get_if_exists=True)
    return actor.remote(settings)
