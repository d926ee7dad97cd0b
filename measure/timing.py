"""Timing and work: the median wall time of a call (the device synchronised around it), the GFLOP torch's counter
sees in a call, and the peak memory of this process."""
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device):
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gflops(fn):
    """GFLOP of fn, with attention on the math backend so that the counter sees every product."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops() / 1e9


def peak_memory_gib(device):
    """The CUDA allocator's peak on a GPU, the process's peak resident memory on the CPU, in GiB."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
