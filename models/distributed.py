"""Where the code runs: the default device, this process's place in a run across processes (GPUs, or machines)
under torchrun, and the signals that stop a run. Training and inference both start here; one process needs no
process group."""
import os
import signal

import torch
import torch.distributed as dist

# The signals that stop a training run on a step boundary, with its exit status once the checkpoint is saved:
# 130 for Ctrl-C (as a shell reports it); 75 (EX_TEMPFAIL, "try again") for a cluster's preemption, which a
# requeue script reads as "saved: resubmit with --resume".
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 75, signal.SIGUSR1: 75}


def default_device():
    """cuda when a GPU is there, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed():
    """(rank, world size, device): under torchrun (WORLD_SIZE > 1) the process group is made, NCCL with one GPU
    per process when there are GPUs, gloo on CPUs, and each process takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, default_device()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier():
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def teardown():
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 ask a run to stop: while this context is open, their handler only
    notes the signal, and the loop asks `requested()` at each step boundary. A second Ctrl-C stops at once, as a
    KeyboardInterrupt. Under torchrun every process gets the same answer, whichever was signalled (one small
    all-reduce over gloo, which never waits for a GPU), so all stop at the same step."""

    def __init__(self, world=1):
        self.world, self.signal, self.previous = world, None, {}
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _note(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum)

    def requested(self):
        """The signal the run stops on, the same on every process, or None."""
        if self.world == 1:
            return self.signal
        flag = torch.tensor([self.signal or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag)) if flag.item() else None


def ignore_stop_signals(*args):
    """For DataLoader workers (worker_init_fn): leave the stop signals to the main process, which stops on a
    step boundary and then ends the workers; a worker killed by Ctrl-C would break the step in progress."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
