"""Scratch buffers kept between calls of the CPU fast path (torch_rows.py), one set per thread.

A fresh (B, T) buffer of a few MB costs more on a CPU than a pass over it: the allocator hands
large blocks back to the operating system when they are freed, so every call faults their pages
in anew (about 2 us a page on a VM; 512 pages for 64 x 4096 float64 values). Buffers that die
inside a call are therefore taken from here: `scratch(name, shape, dtype)` returns a tensor
backed by this thread's buffer `name`, grown as needed and kept.

Rules for callers: a scratch tensor is valid until the same name is asked for again on the same
thread, so it must never be returned, saved for backward, or be a view of anything returned.
Buffers over MAX_BYTES in all (per thread) are not kept: larger batches allocate afresh.
"""

import math
import threading

import torch

MAX_BYTES = 96 << 20  # kept per thread, all names together
MAX_VIEWS = 256  # shapes remembered per thread (a view per name, shape and dtype)
_LOCAL = threading.local()


def _state():
    found = getattr(_LOCAL, "state", None)
    if found is None:
        found = _LOCAL.state = ({}, {})  # name -> uint8 buffer; (name, shape, dtype, inference) -> view
    return found


def _buffers():
    return _state()[0]


def scratch(name, shape, dtype):
    """An uninitialised contiguous CPU tensor of `shape` and `dtype`, backed by this thread's
    buffer `name` where it fits within MAX_BYTES (module docstring), else freshly allocated."""
    buffers, views = _state()
    key = (name, shape, dtype, torch.is_inference_mode_enabled())  # a view made in inference mode is an inference tensor
    found = views.get(key)
    if found is not None and found.shape == shape:  # (an out= of another shape would have resized it)
        return found
    needed = math.prod(shape) * dtype.itemsize
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < needed:
        held = sum(other.numel() for kept, other in buffers.items() if kept != name)
        if held + needed > MAX_BYTES:
            return torch.empty(shape, dtype=dtype)
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buffer = torch.empty(needed, dtype=torch.uint8)
        buffers[name] = buffer
        for old in [k for k in views if k[0] == name]:  # views of the buffer this one replaces
            del views[old]
    if len(views) > MAX_VIEWS:
        views.clear()
    found = views[key] = buffer[:needed].view(dtype).view(shape)
    return found


def release():
    """Drops this thread's buffers (their memory goes back to the allocator)."""
    _LOCAL.state = None
