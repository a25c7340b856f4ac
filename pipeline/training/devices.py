"""Jobs spread over the devices of one box, one worker process per device: train's folds, infer's folds, tune's trials.

``train.devices`` names the devices: a list (``[cuda:0, cuda:1]``; ``[cpu, cpu]`` runs two CPU workers) or
``auto``: every visible GPU when models run on CUDA, else one CPU worker per core (torch's thread count). With one
device the jobs run in this process, one after another, exactly as before. With several, ``run_on_devices``
starts one spawned process per device, at most one per job (concurrent.futures; each worker claims its device as it
starts) and hands each worker the next job when it finishes one; results come back in the jobs' order.

CPU workers split the cores: small models use two threads poorly (lcnet_050 at 96 px trains at 273 images/s on two
threads, 2 x 205 as two one-thread processes), so folds side by side beat one fold on every core. A job that starts
in the last, short round (the fifth fold of five on two workers) takes the cores of the workers left without one
(``threads_for``). What a job writes it writes itself (a fold's folder), so a worker that dies
fails the stage with a message and every job finished before stays finished; a stage process that is killed takes
its workers with it (each watches its parent), so none trains on alone for minutes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.training import distributed
from pipeline.training.loop import torch_device

_device: str | None = None  # the device a worker process claimed (None in the main process)
_threads: list[int] = []  # a worker's torch threads for each job, by the job's place (CPU workers; ``threads_for``)
PARENT_CHECK_SECONDS = 1.0  # how often a worker checks that the stage process that started it is still alive


def resolve_devices(devices: list[str] | str, runtime_device: str) -> list[str]:
    """The device of each worker: the list as given, or for ``auto`` every visible GPU when ``runtime.device``
    resolves to CUDA (without an index), else that one device."""
    if distributed.active():  # under torchrun each process is one rank on one device
        if devices != "auto" and len(devices) > 1:
            raise ConfigError("train.devices names several devices under torchrun, which gives each process its "
                              "own: leave train.devices=auto with torchrun")
        return [str(torch_device(runtime_device))]
    if devices != "auto":
        return [str(torch_device(name)) for name in devices]
    device = torch_device(runtime_device)
    if device.type == "cuda" and device.index is None:
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if device.type == "cpu":
        return ["cpu"] * torch.get_num_threads()
    return [str(device)]


def threads_for(cores: int, cpu_workers: int, jobs: int, index: int) -> int:
    """The threads of CPU job ``index`` of ``jobs``: its worker's share of ``cores``, or, for a job of the last, short
    round (the jobs beyond the last multiple of the workers), the share of the workers that round keeps busy: the
    fifth fold of five on two workers of two cores gets 2 threads. By the job's place, not by the clock, so a fold
    runs on the same threads (and so the same arithmetic) every time."""
    short_round = jobs % cpu_workers
    sharing = short_round if short_round and index >= jobs - short_round else cpu_workers
    return max(1, cores // sharing)


def _exit_when_orphaned(parent: int) -> None:
    """A worker's watch: once ``parent`` (the stage process) is gone, the worker has been handed to another parent, and
    it exits at once instead of finishing its job (minutes of a fold) for nobody."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _claim_device(devices, threads: list[int], log_path: str | None, parent: int) -> None:
    """A worker's start: watch the stage process, take one device off the queue, note each job's share of the cores,
    log to the stage's run log too."""
    global _device, _threads
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="exit-when-orphaned").start()
    _device, _threads = devices.get(), threads
    if log_path is not None:
        from pipeline.cli import Tee

        log = open(log_path, "a", buffering=1, encoding="utf-8")
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)


def _run_job(function, index: int, job: tuple):
    if _device.startswith("cpu"):
        torch.set_num_threads(_threads[index])
    return function(_device, *job)


def run_on_devices(function, jobs: list[tuple], devices: list[str], what: str) -> list:
    """``[function(device, *job) for job in jobs]`` with the jobs spread over ``devices``: in this process for one
    device, else one worker process per device. ``function`` must be importable (a module's top-level function)
    and the jobs picklable. A job's PipelineError stops the stage with its message; a dead worker stops it with ours."""
    devices = devices[:max(1, len(jobs))]  # a worker without a job would only cost its start
    if len(devices) <= 1:
        return [function(devices[0] if devices else None, *job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # CUDA cannot live in a forked process
    queue = context.Queue()
    for device in devices:
        queue.put(device)
    cpu_workers = sum(device.startswith("cpu") for device in devices)
    cores = torch.get_num_threads()
    threads = [threads_for(cores, max(1, cpu_workers), len(jobs), index) for index in range(len(jobs))]
    log_path = getattr(getattr(sys.stderr, "log", None), "name", None)
    print(f"{what}: {len(jobs)} job(s) on {len(devices)} devices {devices}, one worker process each",
          file=sys.stderr)
    pool = ProcessPoolExecutor(len(devices), mp_context=context, initializer=_claim_device,
                               initargs=(queue, threads, log_path, os.getpid()))
    try:
        futures = [pool.submit(_run_job, function, index, job) for index, job in enumerate(jobs)]
        return [future.result() for future in futures]
    except BrokenProcessPool:
        raise PipelineError(f"{what}: a worker process died (killed, or out of memory) before its job finished; "
                            f"what the finished jobs wrote is kept, re-run to go on from there") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
