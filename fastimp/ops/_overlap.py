"""Memory overlap between an op's arguments: an op that writes one tensor while reading another
refuses them when they share memory (the result would depend on the backend's order of reads
and writes). Two tensors overlap when their byte spans on one device intersect (exact for dense
tensors, conservative for interleaved strided views), as ``at::get_overlap_status`` decides in
the compiled ops (``csrc/checks.h``)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from torch import Tensor


def span(t: Tensor) -> Optional[Tuple[int, int]]:
    """[first byte, one past the last byte) that ``t`` may touch; None when empty."""
    if t.numel() == 0:
        return None
    size = t.element_size()
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * size
    lo = hi = 0
    for n, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (n - 1) * stride
        else:  # pragma: no cover - torch has no negative strides today
            lo += (n - 1) * stride
    return start + lo * size, start + (hi + 1) * size


def overlap(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Whether ``a`` and ``b`` (None: no tensor) share memory."""
    if a is None or b is None or a.device != b.device:
        return False
    sa, sb = span(a), span(b)
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


def same_memory(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are the same elements at the same addresses (one tensor, or a view of it
    with its shape and strides)."""
    return (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def message(a: str, i: Optional[int], b: str, j: Optional[int]) -> str:
    """The error for entry ``i`` of argument ``a`` overlapping entry ``j`` of ``b`` (None: the
    argument is one tensor)."""
    if i is None and j is None:
        which = "they"
    elif i == j:
        which = f"tensor {i} of each"
    elif a == b:
        which = f"tensors {i} and {j}"
    else:
        which = f"tensor {i} of '{a}' and tensor {j} of '{b}'"
    names = f"argument '{a}'" if a == b else f"arguments '{a}' and '{b}'"
    return f"fastimp: {names}: {which} overlap in memory; expected separate tensors"


def first_overlap(named: Sequence[Tuple[str, Sequence[Optional[Tensor]]]],
                  allowed=None) -> Optional[Tuple[str, int, str, int]]:
    """The first pair ``(name_a, i, name_b, j)`` of tensors of ``named`` (argument name, its
    tensors) that overlap, skipping pairs ``allowed((name_a, i, a), (name_b, j, b))`` accepts;
    None when none do. A sweep over the spans sorted by address: O(T log T)."""
    items: List[tuple] = []
    for order, (name, tensors) in enumerate(named):
        for i, t in enumerate(tensors):
            if t is None:
                continue
            s = span(t)
            if s is not None:
                items.append((str(t.device), s[0], s[1], order, name, i, t))
    items.sort(key=lambda x: x[:4])
    active: List[tuple] = []
    for item in items:
        device, start = item[0], item[1]
        active = [o for o in active if o[0] == device and o[2] > start]
        for o in active:
            if allowed is None or not allowed((o[4], o[5], o[6]), (item[4], item[5], item[6])):
                first, second = sorted((o, item), key=lambda x: (x[3], x[5]))
                return first[4], first[5], second[4], second[5]
        active.append(item)
    return None
