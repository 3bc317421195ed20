"""``python -m fastimp COMMAND`` under torchrun: join the process group, give every rank its card,
let only rank 0 print and show progress bars, and let rank 0 write what the ranks compute together.

- ``imp``: the runner decides (data-parallel: rank 0 writes; ``--parallel runs``: each rank writes
  its own runs' folders and rank 0 ``results.json``).
- the analyses (``barrier``, ``plane``, ``hessian``, ``prune-scan``, ``robustness``, ``weights``,
  ``lrr-rewound``, ``paper``): every rank computes its share of the points / probes / runs, rank 0
  writes (:func:`fastimp.distributed.main_writes`).
- ``report``, ``backends``: rank 0 alone (the other ranks return at once).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

from fastimp.distributed import env

MAIN_ONLY = ("report", "backends")
RUNNER_WRITES = ("imp",)


@contextlib.contextmanager
def _quiet():
    """stdout and progress bars off (errors still go to stderr)."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def _release_frames(exc: BaseException) -> None:
    """Free what the frames of ``exc``'s traceback (and its context's) hold, e.g. a
    DistributedDataParallel whose reducer holds the process group, so that the group is gone
    when the error leaves it (not at interpreter exit, where gloo can abort)."""
    import gc
    import traceback
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def run_command(command: str, fn: Callable[[], int]) -> int:
    """``fn()`` (a CLI command) as this rank of a torchrun job, or plainly without torchrun."""
    if not env.launched():
        return fn()
    owner = not env.active()  # leave a group the caller made to the caller
    env.init()
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            if not env.is_main():
                stack.enter_context(_quiet())
            if command in MAIN_ONLY:
                status = fn() if env.is_main() else 0
            elif command in RUNNER_WRITES:
                status = fn()
            else:
                stack.enter_context(env.main_writes())
                status = fn()
        ok = True
        return status
    except BaseException as exc:
        _release_frames(exc)
        stopped = env.peer_gone(exc) if isinstance(exc, RuntimeError) else None
        if stopped is None:  # else a collective failed: another rank left (its error says why)
            raise
        raise stopped from exc
    finally:
        # after an error the other ranks may be inside a collective: no barrier then, but leave
        # the group before exiting (a process that exits with it up may abort in its threads)
        if owner:
            env.shutdown() if ok else env.abandon()
