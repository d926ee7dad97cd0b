"""The signals that stop a training run on a step boundary, with a checkpoint.

Ctrl-C (SIGINT) exits with 130 once the checkpoint is saved, as a shell reports it; SIGTERM and SIGUSR1, a
cluster's preemption, exit with 75 (EX_TEMPFAIL, "try again"), which a requeue script reads as "saved: resubmit
with --resume". A run started with SIGINT ignored (`nohup python train_xmdpt.py ... &`, or a job runner that
starts its jobs so) keeps ignoring it, as shells and Python itself do: Ctrl-C in that terminal is not meant for
it. SIGTERM and SIGUSR1 still stop it.
"""
import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 75, signal.SIGUSR1: 75}


class StopSignals:
    """While this context is open, the stop signals only note that a stop was asked for, and the loop asks
    `requested()` at each step boundary. A second Ctrl-C stops at once, as a KeyboardInterrupt. The handlers found
    on entry are given back on exit. Under torchrun every process gets the same answer, whichever was signalled
    (one small all-reduce over gloo, which never waits for a GPU), so all stop at the same step."""

    def __init__(self, world=1):
        self.world, self.signal, self.previous = world, None, {}
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def __enter__(self):
        watched = [s for s in STOP_SIGNALS if not (s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN)]
        self.previous = {s: signal.signal(s, self._note) for s in watched}
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
