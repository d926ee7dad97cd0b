"""Where the code runs: the default device, the precision it computes in there (bf16 autocast on CUDA), and this
process's place in a run across processes (GPUs, or machines) under torchrun. Training, inference, the app and the
scripts all start here; one process needs no process group."""
import os

import torch
import torch.distributed as dist


def default_device():
    """cuda when a GPU is there, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device, enabled=True):
    """bf16 autocast on a CUDA device (when `enabled`), as the released code ran; a no-op elsewhere: the CPU
    computes in float32."""
    cuda = torch.device(device).type == "cuda"
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=enabled and cuda)


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
