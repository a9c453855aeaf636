"""One stage at a time on a cluster's nodes: a Prefect global concurrency limit `r1-cluster-<name>` (slots =
`cluster.concurrency`, default 1 with GPUs, none on CPU), one slot taken around each stage launch made inside a
Prefect flow (the pipeline's and every stage flow's), so two GPU stages never share the nodes; the second waits.

The limit is created when missing, by `r1 serve` and by the first launch, and never changed once it exists (raise it
in the UI, Concurrency). A slot is a lease the flow's process renews: a SIGKILLed flow frees it when the lease expires.
Kubernetes places pods itself (GPU requests), so launches there take no slot; nor does a launch outside a flow run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


def limit_name(cluster: Any) -> str:
    """r1-cluster-<name>: the recipe's cluster.name, else its partition, else its launcher."""
    return f"r1-cluster-{cluster.name or cluster.partition or cluster.launcher}"


def slots(cluster: Any) -> int | None:
    """Stages that may run at once on the cluster; None: no limit (CPU, or Kubernetes)."""
    if cluster.launcher == "kubernetes":
        return None
    return cluster.concurrency or (1 if cluster.gpus_per_node > 0 else None)


def ensure_limit(cluster: Any) -> str | None:
    """Create the cluster's concurrency limit on the Prefect server if it is missing; returns its name (None: none)."""
    n = slots(cluster)
    if n is None:
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(cluster)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=n))
                log.info("created Prefect concurrency limit %s (%d at once)", name, n)
            except ObjectAlreadyExists:  # another launch created it meanwhile
                pass
    return name


@contextlib.contextmanager
def cluster_slot(cluster: Any, what: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold one slot of the cluster's limit while the body runs (inside a Prefect flow run; a no-op elsewhere)."""
    from prefect.context import FlowRunContext

    if slots(cluster) is None or FlowRunContext.get() is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = ensure_limit(cluster)
    say(f"{what}: waiting for a slot of {name}")
    with concurrency(name, occupy=1, strict=True):
        say(f"{what}: holds a slot of {name}")
        yield
