"""The training step of a packed module captured once in a CUDA graph (``torch.cuda.graphs``).

Forward, loss, backward and — when MaskedSGD can run inside a capture (the lr as a 0-dim device
tensor, no host sync) — the masked step are recorded once and replayed every step: one launch
instead of hundreds. The batch is copied into static input tensors first (the loader already put
it on the device); steps whose batch has another shape (the last, smaller batch of an epoch) and
the warm-up steps before the capture run eagerly on the same tensors. Where MaskedSGD cannot be
captured, the graph holds forward and backward and the masked step follows it eagerly (one fused
launch, float lr).

:class:`CudaGraph` wraps ``torch.cuda.CUDAGraph``; :class:`EmulatedGraph` replays by calling the
recorded function, so everything but the capture itself runs (and is tested) on a CPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch

__all__ = ["CudaGraph", "EmulatedGraph", "GraphStep", "supported", "new_graph",
           "optimizer_capturable"]


def supported(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


class CudaGraph:
    """``capture(fn)`` records ``fn()`` (not run); ``replay()`` runs it, returns its output."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.graph = None
        self.out = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @contextlib.contextmanager
    def warmup(self):
        """Eager steps before a capture run on a side stream (as torch.cuda.graphs asks)."""
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            yield
        main.wait_stream(self.stream)

    def capture(self, fn: Callable[[], torch.Tensor]) -> None:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.out = fn()
        self.graph = g

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class EmulatedGraph:
    """The same interface on any device: ``replay()`` calls the recorded function."""

    def __init__(self, device=None):
        self.fn = None

    @property
    def captured(self) -> bool:
        return self.fn is not None

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


def new_graph(device):
    return CudaGraph(device)


_CAPTURABLE: Dict[str, bool] = {}


def optimizer_capturable(device, backend: str = "auto") -> bool:
    """Whether a MaskedSGD step with a 0-dim device-tensor lr can be captured in a CUDA graph on
    ``device`` (and gives the eager result): a tiny capture tried once per device."""
    device = torch.device(device)
    key = f"{device}/{backend}"
    if key not in _CAPTURABLE:
        _CAPTURABLE[key] = device.type != "cuda" or _try_capture(device, backend)
    return _CAPTURABLE[key]


def _try_capture(device, backend) -> bool:
    from fastimp.optim import MaskedSGD
    try:
        p = torch.nn.Parameter(torch.ones(37, device=device))
        p.grad = torch.ones(37, device=device)
        mask = torch.arange(37, device=device) % 3 != 0
        lr = torch.tensor(0.5, device=device)
        opt = MaskedSGD([p], lr=lr, momentum=0.9, masks={p: mask}, backend=backend)
        g = CudaGraph(device)
        with g.warmup():
            opt.step()                                    # p = 0.5 on the mask, buffers made
        g.capture(lambda: opt.step())
        lr.fill_(0.25)
        g.replay()                                        # b = 0.9 + 1 = 1.9, p = 0.5 - 0.475
        torch.cuda.synchronize(device)
        want = torch.where(mask, torch.tensor(0.025, device=device), torch.zeros((), device=device))
        return bool(torch.allclose(p.detach(), want, atol=1e-6))
    except Exception:  # noqa: BLE001 - any failure means: keep the step out of the graph
        return False


class GraphStep:
    """``step(x, y, lr) -> per-run losses`` through a graph (see the module docstring).

    ``eager`` is the :class:`fastimp.batched.engine.EagerStep` it replays; ``warmup_steps``
    eager steps come first (real steps). Gradients are zeroed in place, never set to None, so the
    graph's gradient tensors stay the parameters' between replays and eager steps.
    """

    def __init__(self, eager, graph, capture_optimizer: bool, warmup_steps: int = 3):
        self.eager = eager
        self.graph = graph
        self.with_optimizer = capture_optimizer
        self.warmup_steps = warmup_steps
        self.done = 0
        self.static_x: Optional[torch.Tensor] = None
        self.static_y: Optional[torch.Tensor] = None
        self.lr = torch.zeros((), dtype=torch.float32, device=eager.device)
        self.group = eager.optimizer.param_groups[0]

    def _set_lr(self, lr: float) -> None:
        if self.with_optimizer:
            self.lr.fill_(lr)
            self.group["lr"] = self.lr
        else:
            self.group["lr"] = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        if self.graph.captured and x.shape == self.static_x.shape:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self._set_lr(lr)
            out = self.graph.replay()
            if not self.with_optimizer:
                self.eager.optimizer.step()
            return out
        self._set_lr(lr)
        with self.graph.warmup():
            out = self.eager(x, y, lr=None, set_to_none=False)
        self.done += 1
        if not self.graph.captured and self.done >= self.warmup_steps \
                and x.shape[0] == self.eager.batch_size:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.graph.capture(self._replayed)
        return out

    def _replayed(self) -> torch.Tensor:
        per_run = self.eager.forward_backward(self.static_x, self.static_y, set_to_none=False)
        if self.with_optimizer:
            self.eager.optimizer.step()
        return per_run
