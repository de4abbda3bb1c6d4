"""Process set-up shared by every stage: logging, joining (or starting) Ray, and a terminal that
shows the project's own lines while Ray's internal chatter goes to a log file."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from retro_ray.core.config import Config
from retro_ray.core.layout import log_dir

log = logging.getLogger("retro_ray")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a quiet session swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


# The project's lines carry its logger's name in every process: Ray workers, Train workers and
# Serve replicas import this module too, and the driver tells their lines from Ray's by it.
if not log.handlers:
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter(FORMAT))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

NOISE = re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller|core_worker\.cc|graceful_shutdown"
                   r"|PYTHON worker processes have been started")
"""Ray lines that say nothing to a user even at ERROR level (Ray Train's cleaner without a
dashboard, the C++ core worker's notes, a replica's shutdown race, the raylet's count of the
worker processes it started)."""
HARMLESS_TRACEBACK = re.compile(
    r'placement_group_callback\.py", line \d+, in _stop_cleaner'
    r'|autoscaling_coordinator_client\.py", line \d+, in send_resource_request')
"""Tracebacks that Ray Train's controller logs when the machine is busy and that change nothing:
its placement-group cleaner (a helper actor started with each run) did not confirm its stop within
12 s after the run had finished, or a resource request to the autoscaling coordinator timed out
(it is sent again at the next check). They stay in the log; every other traceback is shown."""
RAY_LINE = re.compile(
    r"\t(DEBUG|INFO|WARNING|ERROR) \S+\.py:\d+ -- "                # Ray's loggers in this process
    r"|^(DEBUG|INFO|WARNING|ERROR) \d{4}-\d\d-\d\d [\d:,]+ \S+ \d+ -- "  # Serve's
    r"|^(\x1b\[\d+m)?\((raylet|autoscaler|gcs_server)\)"              # Ray's daemons
    r"|^(\x1b\[\d+m)?\(.+? pid=\d+(, ip=[\d.]+)?\)"                 # a worker's line, as Ray prints it
    r"|^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+\.cc:\d+"   # Ray's C++ core
)
"""A line on the terminal that Ray printed rather than the project (what ``ray_session`` keeps off it)."""
SEVERE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)")


def setup_logging(level: int = logging.INFO) -> None:
    """The project's level; other libraries' warnings (everything of theirs at DEBUG) in the same format."""
    log.setLevel(level)
    logging.basicConfig(level=logging.DEBUG if level <= logging.DEBUG else logging.WARNING, format=FORMAT)


def quiet_libraries() -> None:
    """Notices of other libraries that say nothing to a user off the terminal: DeepSpeed's
    "Setting accelerator to CPU ... unable to detect" on a machine without CUDA (its accelerator
    is named instead of detected) and Hugging Face's progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()


def progress(done: float, total: float, elapsed_s: float, width: int = 20) -> str:
    """``[#########...........] 45%, ETA 1m12s`` for a progress line (a bar that also reads well
    in a log file)."""
    share = min(1.0, done / total) if total else 1.0
    filled = round(share * width)
    eta = elapsed_s / done * (total - done) if done else 0.0
    minutes, seconds = divmod(int(round(eta)), 60)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}, ETA {f'{minutes}m' if minutes else ''}{seconds:02d}s"


def severe(line: str) -> bool:
    """A real error, not one of Ray's notes."""
    return bool(SEVERE.search(line)) and not NOISE.search(line)


def worker_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """A batch of a worker's lines -> (the project's lines, the failing ones: errors, and
    everything from the first traceback on but ``HARMLESS_TRACEBACK`` blocks and the messages
    logged with them)."""
    start = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), len(lines))
    ours = [line for line in lines[:start] if " retro_ray " in line]
    failing = [line for line in lines[:start] if " retro_ray " not in line and severe(line)]
    i, message = start, None  # message: where the plain line just before a traceback went in failing
    while i < len(lines):
        if "Traceback (most recent call last)" not in lines[i]:
            message = len(failing)
            failing.append(lines[i])
            i += 1
            continue
        end = i + 1  # the block: indented frames, through the exception's line
        while end < len(lines) and lines[end][:1].isspace():
            end += 1
        block = lines[i: end + 1]
        if not HARMLESS_TRACEBACK.search("\n".join(block)):
            failing += block
        elif message == len(failing) - 1 and lines[i - 1].strip():
            failing.pop()  # the message that came with it
        message, i = None, end + 1
    return ours, failing


def init_ray(cfg: Config, address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, or ``cfg.ray.address``), else start a fresh local
    instance. ``address="local"`` rather than a bare ``ray.init()``, which would join whatever
    cluster a stale ``/tmp/ray/ray_current_cluster`` names."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    have = ray.cluster_resources()
    log.info("ray: %s (%d CPUs, %d GPUs, %.1f GiB object store)", address or "a local instance", have.get("CPU", 0),
             have.get("GPU", 0), have.get("object_store_memory", 0) / 2**30)


_to_file: logging.Handler | None = None
"""The log file's handler while a quiet ``ray_session`` is open."""
_muted: list[tuple[logging.Logger, list[logging.Handler]]] = []
"""Ray's loggers pointed at the log file, with the handlers they had."""


def mute_ray_loggers() -> None:
    """Point the console handlers of Ray's loggers (``ray``, ``ray.data``, ``ray.serve``, ...) at
    the open session's log file. Loggers that Ray configures later (Serve's, when it starts)
    need another call; the session's end restores them all."""
    if _to_file is None:
        return
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if (name == "ray" or name.startswith("ray.")) and logger.handlers and _to_file not in logger.handlers:
            _muted.append((logger, logger.handlers[:]))
            logger.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)] + [_to_file]


@contextmanager
def ray_session(cfg: Config, address: str | None = None, verbose: bool = False) -> Iterator[Path | None]:
    """Ray joined or started (``init_ray``) for the commands inside. Unless ``verbose``: Ray's own
    log records, its workers' lines other than the project's and real errors, and what Ray's C++
    core writes to this process's stderr go to ``log_dir(cfg)/ray.log`` (yielded; None when
    verbose); Ray Data's progress dumps and Hugging Face's progress bars are off. All is
    restored on exit but the filters of workers' lines and of Ray's error messages: what comes
    after the session (a shutdown's last words) is filtered too."""
    global _to_file
    if verbose:
        init_ray(cfg, address)
        yield None
        return
    from ray._private import worker as ray_worker
    from ray.data import DataContext
    from transformers.utils import logging as hf_logging

    context = DataContext.get_current()
    progress_bars, hf_bars = context.enable_progress_bars, hf_logging.is_progress_bar_enabled()
    folder = log_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ray.log"
    sink = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    env = {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")  # workers started from here inherit it
    _to_file = logging.StreamHandler(sink)
    _to_file.setFormatter(logging.Formatter(FORMAT))
    mute_ray_loggers()
    # The C++ core writes to file descriptor 2: point it at the log, and the Python streams (ours,
    # the project's log handlers, Ray's printing of worker lines) at the terminal's copy.
    sys.stderr.flush()
    terminal_fd, saved_stderr = os.dup(2), sys.stderr
    sys.stderr = os.fdopen(terminal_fd, "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(sink.fileno(), 2)
    root_handlers = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is saved_stderr]
    for h in root_handlers:
        h.setStream(sys.stderr)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    show = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)  # Ray's own

    def to_log(data: dict) -> None:
        if not sink.closed:  # lines that arrive after the session (a shutdown's last words) are filtered all the same
            who = data.get("actor_name") or data.get("task_name") or ""
            sink.write("".join(f"({who} pid={data.get('pid')}) {line}\n" for line in data.get("lines", [])))

    def forward(data: dict) -> None:
        """Every worker line to the log; the user's share to the terminal, as Ray prints it."""
        to_log(data)
        lines = data.get("lines", [])
        if NOISE.search(data.get("actor_name") or ""):  # its tracebacks too (Ray Train's cleaner without a dashboard)
            return
        if data.get("pid") == "autoscaler":  # on a cluster: which kind of node comes and goes, for which stage
            show(data, ignore_prefix=False)
            return
        ours, failing = worker_lines(lines)
        if ours:  # they say what they are: no worker prefix
            show({**data, "lines": ours}, ignore_prefix=True)
        if failing:
            show({**data, "lines": failing}, ignore_prefix=False)

    def errors(data: dict, ignore_prefix: bool) -> None:
        """The errors Ray sends this driver (a worker died, a task failed): all but the noise."""
        to_log(data)
        kept = [line for line in data.get("lines", []) if not NOISE.search(line)]
        if kept:
            show({**data, "lines": kept}, ignore_prefix)

    try:
        init_ray(cfg, address)
        mute_ray_loggers()  # what ray.init configured
        context.enable_progress_bars = False
        hf_logging.disable_progress_bar()  # model loading in this process (a GGUF file's conversion)
        dispatcher.handlers = [(n, forward if n == "ray_print_logs" else h) for n, h in dispatcher.handlers]
        errors.__wrapped__ = show
        ray_worker.print_to_stdstream = errors  # what Ray's error listener prints with
        yield path
    finally:
        context.enable_progress_bars = progress_bars
        if hf_bars:
            hf_logging.enable_progress_bar()
        for logger, handlers in _muted:
            logger.handlers = handlers
        _muted.clear()
        _to_file = None
        for h in root_handlers:
            h.setStream(saved_stderr)
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), 2)
        sys.stderr.close()
        sys.stderr = saved_stderr
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.update({k: v})
        sink.close()
