"""Where the sandboxed step runs: here (the default) or on a Dask cluster, both from bundle bytes to result bytes.

An executor is called as ``executor(bundle, gpu) -> result`` (:mod:`bngrade.sandbox.bundle`). :class:`Local`
runs the bundle on this machine; :class:`Dask` sends it, as bytes, to a ``distributed`` worker, which checks its
own environment against the bundle's fingerprint; :class:`Cached` answers from the course's execution cache
(:mod:`bngrade.pipeline.cache`) when it can. :func:`from_env` builds the one a grading run asked for.
"""
import os

from bngrade.pipeline.cache import Cache, key
from bngrade.sandbox.bundle import run_bundle, worker_task

#: seconds to reach a scheduler before giving up
CONNECT_SECONDS = 10


class Local:
    """Run each bundle on this machine, as before there were executors."""

    def __init__(self, use_sandbox=True, extra_ro=()):
        self.use_sandbox, self.extra_ro = use_sandbox, list(extra_ro)

    def __call__(self, bundle, gpu=False):
        return run_bundle(bundle, self.use_sandbox, self.extra_ro)


def connect(address):
    """A ``distributed`` client of the scheduler at ``address``; ``OSError`` when it cannot be reached."""
    from distributed import Client

    return Client(address, timeout=CONNECT_SECONDS, set_as_default=False)


def gpu_workers(client):
    """Workers of ``client``'s cluster that declare a GPU resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [w for w, info in workers.items() if info.get("resources", {}).get("GPU", 0) >= 1]


class Dask:
    """Run each bundle as a task on the cluster at ``address``; the GPU ones only where a worker has a GPU."""

    use_sandbox, extra_ro = True, ()

    def __init__(self, address):
        self.client = connect(address)

    def __call__(self, bundle, gpu=False):
        future = self.client.submit(worker_task, bundle, pure=False, resources={"GPU": 1} if gpu else None)
        return future.result()


class Cached:
    """``inner``, with its results kept in ``cache``; ``refresh`` runs every bundle again (and stores it)."""

    def __init__(self, inner, cache, refresh=False):
        self.inner, self.cache, self.refresh = inner, cache, refresh
        self.use_sandbox, self.extra_ro = inner.use_sandbox, inner.extra_ro
        self.hit = False

    def __call__(self, bundle, gpu=False):
        name = key(bundle, self.inner.use_sandbox, self.inner.extra_ro)
        found = None if self.refresh else self.cache.get(name)
        self.hit = found is not None
        if found is None:
            found = self.inner(bundle, gpu)
            self.cache.put(name, found)
        return found


def from_env():
    """The executor of this grading run: ``BNGRADE_CLUSTER`` (a scheduler's address) or local, behind the cache
    in ``BNGRADE_CACHE`` when set (``BNGRADE_NO_CACHE=1``: run everything again)."""
    extra = [p for p in os.environ.get("BNGRADE_SANDBOX_PYTHONPATH", "").split(os.pathsep) if p]
    address = os.environ.get("BNGRADE_CLUSTER")
    inner = Dask(address) if address else Local(os.environ.get("BNGRADE_NO_SANDBOX") != "1", extra)
    folder = os.environ.get("BNGRADE_CACHE")
    return Cached(inner, Cache(folder), os.environ.get("BNGRADE_NO_CACHE") == "1") if folder else inner
