"""What a measurement is valid on (the GPU, or the CPU's model and thread count), how to wait for a device's queued
work, how much memory is free, and where the weights' memory sits (2 MiB pages)."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import psutil
import torch
from torch import nn


def cpu_name() -> str:
    """The CPU's model as Linux names it ("cpu" where /proc/cpuinfo is not there)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def machine(device: torch.device) -> str:
    """The device a measurement is valid on: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def available_memory() -> int:
    """Bytes the machine can give a new allocation without swapping."""
    return psutil.virtual_memory().available


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux's madvise advice numbers (MADV_COLLAPSE since Linux 6.1)


def back_with_huge_pages(model: nn.Module) -> None:
    """Ask Linux to back the weights' memory with 2 MiB pages, now (MADV_COLLAPSE): a token streams every weight
    once, and on 4 KiB pages that is 65,000 page walks a token and a hardware prefetcher that stops at every page's
    end (docs/PERFORMANCE.md measures what that costs). Each weight's range is widened to whole huge pages: the
    weights were allocated one after another, so what the widening takes in is mostly weights too. Elsewhere (no
    Linux, an older kernel, THP turned off) the advice is refused and nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return
    done = set()
    for parameter in model.parameters():
        storage = parameter.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if parameter.device.type != "cpu" or size < _HUGE_PAGE // 2 or start in done:
            continue
        done.add(start)
        low, high = start // _HUGE_PAGE * _HUGE_PAGE, -(-(start + size) // _HUGE_PAGE) * _HUGE_PAGE
        for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
            libc.madvise(low, high - low, advice)  # a refusal (EINVAL, ENOMEM) leaves the pages as they were

