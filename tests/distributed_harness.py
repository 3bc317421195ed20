"""Start N processes the way torchrun does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; gloo on the CPU) and wait for all of them; when one fails the
others are stopped, as torchrun's agent does. ``torchrun_cmd`` gives the real torchrun command."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""      # gloo on the CPU, even on a GPU machine
    env.pop("TQDM_DISABLE", None)
    env.update(extra or {})
    return env


@dataclass
class Result:
    returncodes: List[int]
    stdout: List[str]
    stderr: List[str]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def explain(self) -> str:
        return "\n".join(f"--- rank {r}: exit {rc}\n{out[-3000:]}\n{err[-6000:]}"
                         for r, (rc, out, err) in enumerate(zip(self.returncodes, self.stdout,
                                                                self.stderr)))


def launch(args: Sequence[str], nproc: int = 2, env: Optional[Dict[str, str]] = None,
           timeout: float = 600.0, cwd=None) -> Result:
    """``python ARGS`` as ranks 0..nproc-1 of one gloo job on this machine."""
    port = free_port()
    procs = []
    logs = []
    for rank in range(nproc):
        e = base_env(env)
        e.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        out = tempfile.TemporaryFile("w+")
        err = tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], env=e, cwd=cwd, stdout=out,
                                      stderr=err, start_new_session=True))
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            time.sleep(2.0)  # let the others report their own error first
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
            break
        time.sleep(0.05)
    texts = []
    for out, err in logs:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    return Result([p.returncode for p in procs], [t[0] for t in texts], [t[1] for t in texts])


def torchrun_cmd(nproc: int = 2) -> List[str]:
    """``python -m torch.distributed.run`` on this machine with ``nproc`` CPU processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--max-restarts=0"]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it (torchrun starts its workers in sessions of
    their own, so killing its process group would leave them running)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.02)   # the workers are not our children: wait until they have exited


def _alive(pid: int) -> bool:
    """Running (not yet exited: a zombie has closed its files, its locks are gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
