"""Run one function on several data-parallel *ranks*, each with an ``all_reduce`` that sums over them.

Three backends with the same interface, ``run(fn, per_rank_args, timeout)``:

* :func:`run_threads`: one thread per rank in this process; ``all_reduce`` meets the others at a barrier.
  Deterministic (the sum runs in rank order) and cheap: the tests and the grader use it by default.
* :func:`run_processes`: one forked process per rank, with no framework at all: each rank's ``all_reduce``
  sends its array to this process over a pipe, which sums in rank order and sends the sum back (a star).
  The grader runs its multi-process case on it, inside a sandbox where torch cannot be imported.
* :func:`run_gloo`: one process per rank (forked, so functions defined in a notebook work), joined by
  ``torch.distributed`` with the gloo backend on 127.0.0.1; ``all_reduce`` is ``dist.all_reduce``.
  This works on the CPU, where ``torch.nn.SyncBatchNorm`` refuses CPU tensors (the book uses it).

Each rank calls ``fn(*per_rank_args[rank], all_reduce)``. Every backend counts what every rank reduced
(:class:`Traffic`), and stops with a clear error when a rank waits longer than ``timeout`` seconds for the
others, which is what happens when the ranks do not call ``all_reduce`` the same number of times.
"""
import multiprocessing
import os
import socket
import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait

import numpy as np


START_S = 5.0  # on top of a gloo run's timeout: starting the processes and joining the group
FORK_S = 1.0  # on top of a process run's timeout: forking the ranks


class RankError(RuntimeError):
    """A rank failed, or waited too long for the others."""


class Traffic:
    """What one rank passed to ``all_reduce``: ``sizes[k]`` values and ``bytes[k]`` bytes at call k."""

    def __init__(self):
        self.sizes, self.bytes = [], []

    def add(self, array):
        self.sizes.append(int(array.size))
        self.bytes.append(int(array.nbytes))

    def summary(self):
        return {"calls": len(self.sizes), "values": sum(self.sizes), "bytes": sum(self.bytes)}


def _timeout_message(rank, timeout, call):
    return (f"rank {rank} waited more than {timeout:g} s for the other ranks at its all_reduce call {call + 1}: "
            "every rank must call all_reduce the same number of times, in the same order")


def run_threads(fn, per_rank_args, timeout=60.0):
    """Run ``fn`` on ``len(per_rank_args)`` ranks as threads.

    Returns:
        (results, traffic): the list of each rank's return value, and each rank's :class:`Traffic`.
    """
    world = len(per_rank_args)
    cond = threading.Condition()
    state = {"arrived": 0, "generation": 0, "total": None, "stopped": None}
    slots = [None] * world
    traffic = [Traffic() for _ in range(world)]
    results, errors = [None] * world, [None] * world

    def all_reduce_for(rank):
        def all_reduce(array):
            array = np.array(array, copy=True)
            call = len(traffic[rank].sizes)
            traffic[rank].add(array)
            with cond:
                slots[rank] = array
                state["arrived"] += 1
                generation = state["generation"]
                if state["arrived"] == world:
                    shapes = {s.shape for s in slots}
                    if len(shapes) > 1:
                        state["stopped"] = (f"all_reduce call {call + 1} got arrays of different shapes on "
                                            f"different ranks: {sorted(shapes)}")
                        cond.notify_all()
                        raise RankError(state["stopped"])
                    total = slots[0].copy()
                    for other in slots[1:]:
                        total = total + other
                    state.update(arrived=0, generation=generation + 1, total=total)
                    cond.notify_all()
                    return total.copy()
                done = cond.wait_for(lambda: state["generation"] != generation or state["stopped"], timeout)
                if state["generation"] != generation:
                    return state["total"].copy()
                raise RankError(state["stopped"] if done else _timeout_message(rank, timeout, call))
        return all_reduce

    def run(rank):
        try:
            results[rank] = fn(*per_rank_args[rank], all_reduce_for(rank))
            why = (f"rank {rank} returned after {len(traffic[rank].sizes)} all_reduce calls while another rank "
                   "was waiting for one more: every rank must call all_reduce the same number of times")
        except BaseException as exc:  # reported to the caller below
            errors[rank] = exc
            why = f"rank {rank} failed: {type(exc).__name__}: {exc}"
        with cond:  # a rank that is done can never meet the others again
            state["stopped"] = state["stopped"] or why
            cond.notify_all()

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world)]
    deadline = time.monotonic() + timeout + 0.5  # the ranks' own waits time out first, and say where
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
    if stuck:  # a thread cannot be killed: it is a daemon, and its rank's all_reduce fails from now on
        with cond:
            state["stopped"] = state["stopped"] or f"the run was stopped after {timeout:g} s"
            cond.notify_all()
        waiting = next((f" ({e})" for e in errors if e is not None), "")
        raise RankError(f"ranks {stuck} did not finish within {timeout:g} s{waiting}")
    _raise_first([e for e in errors if not isinstance(e, RankError)])
    _same_calls([t.sizes for t in traffic])
    _raise_first(errors)
    return results, traffic


def _same_calls(sizes):
    """Raise when the ranks called all_reduce different numbers of times (``sizes[r]``: rank r's calls)."""
    if len({len(s) for s in sizes}) > 1:
        raise RankError("the ranks called all_reduce different numbers of times ("
                        + ", ".join(f"rank {r}: {len(s)}" for r, s in enumerate(sizes))
                        + "): every rank must call it the same number of times, in the same order")


def _raise_first(errors):
    """Raise the first of ``errors`` that is not None, if any."""
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_rank(fn, args, rank, world, port, timeout, conn):
    """The body of one gloo process: join the group, run ``fn``, send back (kind, result or message, traffic).

    ``kind`` is "ok", "error" (the function's own error) or "peer" (could not join, or lost, the other ranks).
    """
    import torch
    import torch.distributed as dist

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # c10d's C++ warnings (no hostname in a sandbox): stderr would fail a graded cell
    torch.set_num_threads(1)
    traffic = Traffic()

    def collective(run, call):
        try:
            run()
        except Exception as exc:  # gloo's timeout or a crashed peer
            if "timed out" in str(exc).lower():
                raise RankError(_timeout_message(rank, timeout, call)) from None
            raise RankError(f"rank {rank} lost the other ranks at all_reduce call {call + 1} "
                            "(another rank failed or returned early)") from None

    try:
        try:  # joining is collective too: a rank that fails right after joining can break the others' join
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001 - reported as a lost peer; a rank's own error wins over it
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise RankError(f"rank {rank} could not join the other ranks ({reason})") from None

        def all_reduce(array):
            tensor = torch.from_numpy(np.array(array, copy=True))
            call = len(traffic.sizes)
            traffic.add(tensor.numpy())
            collective(lambda: dist.all_reduce(tensor), call)
            return tensor.numpy()

        result = fn(*args, all_reduce)
        collective(dist.barrier, len(traffic.sizes))  # the others may still wait for an all_reduce of this rank
        conn.send(("ok", result, traffic.sizes, traffic.bytes))
    except RankError as exc:
        conn.send(("peer", str(exc), traffic.sizes, traffic.bytes))
    except BaseException as exc:  # noqa: BLE001 - the function's own error goes back to the parent as text
        conn.send(("error", f"{type(exc).__name__}: {exc}", traffic.sizes, traffic.bytes))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def run_gloo(fn, per_rank_args, timeout=60.0):
    """Run ``fn`` on ``len(per_rank_args)`` ranks as processes joined by torch.distributed (gloo, loopback).

    A rank that fails or hangs stops the run: every process is killed by the end of ``timeout`` seconds
    (plus a few for start-up), and none outlives the call.

    Returns:
        (results, traffic), as :func:`run_threads`.
    """
    world = len(per_rank_args)
    context = multiprocessing.get_context("fork")
    port = _free_port()
    pipes = [context.Pipe(duplex=False) for _ in range(world)]
    procs = [context.Process(target=_gloo_rank, args=(fn, per_rank_args[r], r, world, port, timeout, pipes[r][1]),
                             daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    for _, send in pipes:
        send.close()
    replies = [None] * world
    pending = {recv: rank for rank, (recv, _) in enumerate(pipes)}
    deadline = time.monotonic() + timeout + START_S
    try:
        while pending:
            ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankError(f"ranks {sorted(pending.values())} did not finish within {timeout:g} s; their "
                                "processes were killed")
            for recv in ready:
                rank = pending.pop(recv)
                try:
                    replies[rank] = recv.recv()
                except EOFError:
                    procs[rank].join(1)
                    replies[rank] = ("error", f"its process died (exit code {procs[rank].exitcode})", [], [])
    finally:
        for proc in procs:
            proc.join(0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [None if kind == "ok" else (RankError if kind == "peer" else RuntimeError)(
        message if kind == "peer" else f"rank {rank}: {message}") for rank, (kind, message, _, _) in enumerate(replies)]
    _raise_first([e for e in errors if not isinstance(e, RankError)])
    _same_calls([reply[2] for reply in replies])
    _raise_first(errors)
    traffic = []
    for _, _, sizes, nbytes in replies:
        t = Traffic()
        t.sizes, t.bytes = list(sizes), list(nbytes)
        traffic.append(t)
    return [reply[1] for reply in replies], traffic


def _process_rank(fn, args, conn, inherited):
    """The body of one forked rank: ``fn`` with an ``all_reduce`` through the parent; then one reply,
    ("ok", result) or ("error", "Type: message"). The parent kills a rank that it no longer needs.

    ``inherited``: the parent's ends of the pipes, which this fork holds too; closed first, so that the parent
    sees the end of a rank's pipe when that rank's process dies."""
    for other in inherited:
        other.close()

    def all_reduce(array):
        conn.send(("reduce", np.array(array, copy=True)))
        return conn.recv()

    try:
        result = fn(*args, all_reduce)
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - the function's own error goes back to the parent as text
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Star:
    """The parent's side of :func:`run_processes`: every rank's pipe, what each sent, and the rounds.

    A rank is *waiting* from its all_reduce call until the round's sum comes back, *done* once it replied (or
    its process died), and *computing* otherwise.
    """

    def __init__(self, conns, timeout):
        self.conns, self.timeout = conns, timeout
        world = len(conns)
        self.traffic = [Traffic() for _ in range(world)]
        self.replies = [None] * world     # ("ok", result) or ("error", message)
        self.waiting = {}                 # rank -> (array, time it arrived)

    def computing(self):
        return [r for r, reply in enumerate(self.replies) if reply is None and r not in self.waiting]

    def receive(self, rank, procs):
        """Take one message from ``rank``; returns a RankError when it ends the run, else None."""
        try:
            kind, value = self.conns[rank].recv()
        except (EOFError, OSError):
            procs[rank].join(1)
            self.replies[rank] = ("error", f"its process died (exit code {procs[rank].exitcode})")
            return None
        if kind != "reduce":
            self.replies[rank] = (kind, value)
            return None
        self.traffic[rank].add(value)
        self.waiting[rank] = (value, time.monotonic())
        return self._round() if len(self.waiting) == len(self.conns) else None

    def _round(self):
        """Every rank is waiting: send each the sum, in rank order (or end the run on different shapes)."""
        slots = [self.waiting[r][0] for r in range(len(self.conns))]
        shapes = {s.shape for s in slots}
        if len(shapes) > 1:
            return RankError(f"all_reduce call {len(self.traffic[0].sizes)} got arrays of different shapes on "
                             f"different ranks: {sorted(shapes)}")
        total = slots[0].copy()
        for other in slots[1:]:
            total = total + other
        self.waiting.clear()
        for conn in self.conns:
            conn.send(total)
        return None

    def expired(self):
        """The first waiting rank that has waited longer than the timeout, or None."""
        now = time.monotonic()
        return next((r for r, (_, since) in sorted(self.waiting.items()) if now - since > self.timeout), None)

    def next_expiry(self):
        return min((since + self.timeout for _, since in self.waiting.values()), default=float("inf"))

    def check(self):
        """Raise a rank's own error first (as text: it happened in another process), then unequal numbers of
        all_reduce calls."""
        _raise_first([RuntimeError(f"rank {r}: {reply[1]}") for r, reply in enumerate(self.replies)
                      if reply is not None and reply[0] != "ok"])
        _same_calls([t.sizes for t in self.traffic])


def run_processes(fn, per_rank_args, timeout=60.0):
    """Run ``fn`` on ``len(per_rank_args)`` ranks as forked processes whose all_reduce goes through this one.

    No framework is needed: the arrays travel over pipes. A rank's own error wins over the others' waits; a
    rank that waits more than ``timeout`` seconds at an all_reduce, or a run longer than ``timeout`` (plus a
    second to fork), ends the run, and every process is killed before this returns.

    Returns:
        (results, traffic), as :func:`run_threads`.
    """
    context = multiprocessing.get_context("fork")
    conns, procs = [], []
    for args in per_rank_args:
        parent, child = context.Pipe()
        procs.append(context.Process(target=_process_rank, args=(fn, args, child, conns + [parent]), daemon=True))
        procs[-1].start()
        child.close()
        conns.append(parent)
    star = _Star(conns, timeout)
    deadline = time.monotonic() + timeout + FORK_S
    try:
        while star.computing() or star.waiting:
            computing = star.computing()
            if not computing:  # some ranks wait for others that are done: that round can never complete
                star.check()
                raise RankError("a rank returned while the others were waiting for its all_reduce")
            ready = wait([star.conns[r] for r in computing],
                         max(0.0, min(deadline, star.next_expiry()) - time.monotonic()))
            late = star.expired()
            if late is not None:
                call = len(star.traffic[late].sizes) - 1
                raise RankError(f"ranks {computing} did not finish within {timeout:g} s "
                                f"({_timeout_message(late, timeout, call)}); their processes were killed")
            if not ready and time.monotonic() >= deadline:
                raise RankError(f"ranks {computing} did not finish within {timeout:g} s; their processes "
                                "were killed")
            for conn in ready:
                stop = star.receive(star.conns.index(conn), procs)
                if stop is not None:
                    raise stop
    finally:
        for rank, proc in enumerate(procs):  # a rank that replied exits by itself; the others are not needed
            proc.join(0 if star.replies[rank] is None else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conns[rank].close()
    star.check()
    return [value for _, value in star.replies], star.traffic


BACKENDS = {"threads": run_threads, "processes": run_processes, "gloo": run_gloo}
