"""Stage prepare: check the competition folder, decode every image once into a uint8 cache.

Reads:  the competition folder (``data.*``; with ``data.source: elpv`` it is first built
        from the elpv-dataset package under ``paths.competition``; with ``data.source: kaggle`` it is first
        downloaded by the kaggle CLI into ``paths.competition``/<data.competition>/, once: ``pipeline.kaggle``).
Writes: ``paths.cache``/ train.npy, test.npy (N x H x W x C uint8, memory-mappable),
        train.parquet, test.parquet (row order of the arrays), meta.json (classes, heads,
        per-channel mean/std, what the cache was built from), stats.json.

Every image is decoded in one streaming pass (a process pool where cores allow) straight
into a memory-mapped file, so peak memory does not grow with the competition. Problems
(missing, empty, corrupt images) are collected over the whole pass and reported together;
a failed or killed run leaves the previous cache or none. Re-running with the same inputs
and settings does no work. "The same images" means the same bytes (meta.json's fingerprint), so
a cache pulled from a DVC remote stays valid on a machine that copied the images anew; a note
beside the cache (``.cache.stamp.json``: files' sizes and times) spares reading them every run.
"""

from __future__ import annotations

import concurrent.futures.process
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import active_children, get_context

import numpy as np
from tqdm import tqdm

from pipeline import cli, kaggle, layout
from pipeline.artifacts import atomic_dir, write_json
from pipeline.config import Config
from pipeline.data.competition import Competition, read_competition
from pipeline.data.images import try_load_image
from pipeline.errors import DataError, PipelineError

CACHE_VERSION = 1


def _digest(cfg: Config, competition: Competition, image_key) -> str:
    """A digest of the settings, ids and labels, and ``image_key(path)`` of every image file, in the tables' order."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, list(cfg.data.size_hw), cfg.data.channels, competition.class_names,
                              competition.heads, competition.aux, competition.compose]).encode())
    for frame in (competition.train, competition.test):
        digest.update(frame.drop(columns="path").to_csv(index=False).encode())
        for path in frame["path"]:
            digest.update(f"{image_key(path)}\n".encode())
    return digest.hexdigest()


def fingerprint(cfg: Config, competition: Competition) -> str:
    """A digest of everything the cache depends on: settings, ids, labels and the image files' bytes.

    The same on every machine with the same images, wherever they lie and however they were copied (a teammate's
    clone rebuilds the ELPV folder with new file times; a folder competition sits under another home directory; a
    work directory is copied): a cache pulled from a DVC remote stays valid and no fold retrains.
    """
    def content(path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:  # hashlib.file_digest is Python 3.11+
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return _digest(cfg, competition, content)


def quick_key(cfg: Config, competition: Competition) -> str:
    """:func:`fingerprint` with the image files' sizes and times for their bytes: valid on this machine only,
    where it spares reading every image when nothing was touched."""
    def stat(path) -> str:
        info = os.stat(path)
        return f"{path}|{info.st_size}|{info.st_mtime_ns}"

    return _digest(cfg, competition, stat)


def cache_is_current(cfg: Config, competition: Competition) -> tuple[bool, dict]:
    """Whether the cache was built from these images and settings, and the stamp that says so on this machine:
    the quick key and the fingerprint, kept beside the cache (outside what DVC tracks and shares)."""
    meta_path, stamp_path = layout.cache_dir(cfg) / layout.CACHE_META, layout.cache_stamp(cfg)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    built = meta.get("fingerprint")
    if meta.get("extra_sizes", []) != [list(size) for size in layout.cache_extra_sizes(cfg)]:
        built = None  # the same images, but not at every size the config asks for
    stamp = {"quick": quick_key(cfg, competition), "fingerprint": built}
    with contextlib.suppress(OSError, ValueError):
        if built and json.loads(stamp_path.read_text()) == stamp:
            return True, stamp  # no image touched since the last look
    stamp["fingerprint"] = fingerprint(cfg, competition)
    if built != stamp["fingerprint"]:
        return False, stamp
    with contextlib.suppress(DataError):  # only a time saver: a read-only work folder reads every image each time
        write_json(stamp_path, stamp)  # same bytes, new times (copied, pulled, rebuilt): a quick look next time
    return True, stamp


def is_broken_pool_cleanup_error(args) -> bool:
    """Whether a thread's uncaught exception is the executor's manager thread failing to clean up a broken pool.

    CPython 3.11's manager thread, on finding a dead worker, fails every pending future with
    BrokenProcessPool first and only then counts the surviving workers; when the main thread is
    still starting a worker at that moment, the count raises "dictionary changed size during
    iteration". The main thread already has the BrokenProcessPool and reports it as a clear error;
    that race's traceback only adds noise.
    """
    frames = traceback.extract_tb(args.exc_traceback)
    return any(frame.filename == concurrent.futures.process.__file__ and frame.name == "terminate_broken"
               for frame in frames)


def start_decoding(pool: ProcessPoolExecutor, tasks: list):
    """``pool.map`` of :func:`try_load_image` over ``tasks``, where a pool that breaks while it starts is always a
    BrokenProcessPool.

    ``map`` submits every chunk at once, and submitting starts workers. In CPython 3.11, when a worker dies while
    the main thread is still starting another, the manager thread closes the call queue under it, and the start
    fails with OSError "handle is closed" (seen in CI) instead of BrokenProcessPool.
    """
    try:
        return pool.map(try_load_image, tasks, chunksize=32)
    except OSError as error:
        raise BrokenProcessPool(f"a worker could not start: {error}") from None


@contextlib.contextmanager
def quiet_broken_pool_cleanup():
    """Within the block, drop the traceback of :func:`is_broken_pool_cleanup_error` errors; others print as usual."""
    previous = threading.excepthook

    def hook(args):
        if not is_broken_pool_cleanup_error(args):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def decode_split(paths: list, size_hw, channels: int, out_path, workers: int, desc: str):
    """Decode ``paths`` into an N x H x W x C uint8 ``.npy`` file; returns (per-image failures, sum, sum of squares).

    Images are appended to the file in order through a plain file handle, not a writable
    memory map: written pages go to the page cache instead of this process's resident
    memory, so the peak memory stays flat however many images there are.
    """
    shape = (len(paths), size_hw[0], size_hw[1], channels)
    header = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=shape)
    offset = header.offset
    del header
    blank = np.zeros(shape[1:], dtype=np.uint8)
    failures: list[tuple[str, str]] = []
    total = np.zeros(channels, dtype=np.float64)
    squares = np.zeros(channels, dtype=np.float64)
    tasks = [(str(p), size_hw, channels) for p in paths]
    # A spawned worker re-imports the package (about a second each): worth it only for many images.
    # An executor rather than multiprocessing.Pool: when a worker dies (killed, out of memory) a Pool
    # quietly replaces it and waits forever for the lost chunk; the executor raises BrokenProcessPool.
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            if workers > 1 and len(tasks) >= 1000 else None)
    # The hook is removed only after shutdown() has joined the manager thread: it covers its whole life.
    with quiet_broken_pool_cleanup() if pool else contextlib.nullcontext():
        try:
            # Inside the try: a worker that dies while the pool starts breaks it already at submission.
            results = start_decoding(pool, tasks) if pool else map(try_load_image, tasks)
            with open(out_path, "r+b") as handle:
                handle.seek(offset)
                for index, (array, problem) in enumerate(tqdm(results, total=len(tasks), desc=desc, unit="img",
                                                              file=sys.stderr, mininterval=1.0, disable=None)):
                    if problem:
                        failures.append((tasks[index][0], problem))
                        array = blank
                    handle.write(array.tobytes())
                    pixels = array.reshape(-1, channels).astype(np.float64)
                    total += pixels.sum(axis=0)
                    squares += (pixels ** 2).sum(axis=0)
        except BrokenProcessPool as error:
            # Python 3.11's executor joins the surviving workers without stopping them (they wait for work
            # forever): stop them here, or shutdown() below would hang. prepare starts no other processes.
            for child in active_children():
                child.kill()
            raise PipelineError(f"prepare: a process decoding images died ({error}); often the machine ran out of "
                                f"memory: re-run, or set data.workers=1 to decode in this process. The previous cache, "
                                f"if any, is untouched") from None
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
    return failures, total, squares


def main(cfg: Config) -> dict:
    cfg = kaggle.as_folder_competition(cfg) if cfg.data.source == "kaggle" else cfg  # downloaded once, then a folder
    competition = read_competition(cfg)
    cache_dir = layout.cache_dir(cfg)
    current, stamp = cache_is_current(cfg, competition)
    key = stamp["fingerprint"]
    if current:
        print(f"prepare: the cache in {cache_dir} is up to date ({len(competition.train)} train, "
              f"{len(competition.test)} test images)", file=sys.stderr)
        return json.loads((cache_dir / layout.CACHE_STATS).read_text())

    workers = cfg.data.workers or min(os.cpu_count() or 1, 8)
    started = time.perf_counter()
    channels = cfg.data.channels
    with atomic_dir(cache_dir) as folder:
        failures, total, squares = [], np.zeros(channels), np.zeros(channels)
        for split, frame in (("train", competition.train), ("test", competition.test)):
            problems, split_total, split_squares = decode_split(
                list(frame["path"]), cfg.data.size_hw, channels, folder / layout.cache_images_name(split), workers,
                f"prepare {split}")
            failures += problems
            if split == "train":
                total, squares = split_total, split_squares
            for size_hw in layout.cache_extra_sizes(cfg) if not problems else []:  # the embed stage's size
                failures += decode_split(list(frame["path"]), size_hw, channels,
                                         folder / layout.cache_images_name(split, size_hw), workers,
                                         f"prepare {split} {size_hw[0]}x{size_hw[1]}")[0]
        if failures:
            listing = "\n  ".join(f"{path}: {problem}" for path, problem in failures[:50])
            more = f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""
            raise DataError(f"{len(failures)} image(s) cannot be used; fix or remove them (no cache was written):"
                            f"\n  {listing}{more}")
        seconds = time.perf_counter() - started
        pixel_count = len(competition.train) * cfg.data.size_hw[0] * cfg.data.size_hw[1]
        mean = total / pixel_count
        std = np.sqrt(np.maximum(squares / pixel_count - mean ** 2, 1e-12))
        for split, frame in (("train", competition.train), ("test", competition.test)):
            table = frame.copy()
            table["path"] = table["path"].astype(str)
            table.to_parquet(folder / layout.cache_index_name(split), index=False)
        meta = {"fingerprint": key, "size_hw": list(cfg.data.size_hw), "channels": channels,
                "extra_sizes": [list(size) for size in layout.cache_extra_sizes(cfg)],
                "class_names": competition.class_names, "heads": competition.heads, "aux": competition.aux,
                "compose": competition.compose, "id_col": competition.id_col, "target_col": competition.target_col,
                "mean": (mean / 255.0).tolist(), "std": (std / 255.0).tolist()}
        image_count = len(competition.train) + len(competition.test)
        stats = {"train_images": len(competition.train), "test_images": len(competition.test),
                 "classes": len(competition.class_names), "mean": meta["mean"], "std": meta["std"],
                 "seconds": round(seconds, 2), "images_per_second": round(image_count / max(seconds, 1e-9), 1),
                 "workers": workers}
        write_json(folder / layout.CACHE_STATS, stats)
        write_json(folder / layout.CACHE_META, meta)
        # The competition's own tables travel with the cache so later stages need not re-read the folder.
        competition.sample_submission.to_csv(folder / layout.CACHE_SAMPLE_SUBMISSION, index=False)
        if competition.solution is not None:
            competition.solution.to_csv(folder / layout.CACHE_SOLUTION, index=False)
    write_json(layout.cache_stamp(cfg), stamp)
    print(f"prepare: cached {image_count} images at {list(cfg.data.size_hw)} x {channels}ch in {seconds:.1f}s "
          f"({stats['images_per_second']} img/s, {workers} workers)", file=sys.stderr)
    return stats


if __name__ == "__main__":
    cli.run(main, "Check the competition folder and build the image cache.")
