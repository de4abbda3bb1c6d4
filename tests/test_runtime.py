"""The quiet terminal: which of a worker's lines reach the user."""

from retro_ray.core.runtime import worker_lines

RAY = "/venv/lib/python3.11/site-packages/ray"
# What Ray Train's controller logs after a short run on a busy machine (its cleaner's stop timed out).
CLEANER = [
    "Failed to stop PlacementGroupCleaner gracefully.",
    "Traceback (most recent call last):",
    f'  File "{RAY}/train/v2/_internal/callbacks/placement_group_callback.py", line 126, in _stop_cleaner',
    "    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)",
    f'  File "{RAY}/_private/worker.py", line 3009, in get',
    "    values, debugger_breakpoint = worker.get_objects(",
    "                                  ^^^^^^^^^^^^^^^^^^^",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
RESOURCE_REQUEST = [
    "Failed to send resource request for train-5f1d. If this only happens transiently during network partition "
    "or CPU being overloaded, it's safe to ignore this error.",
    "Traceback (most recent call last):",
    f'  File "{RAY}/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, '
    "in send_resource_request",
    "    ray.get(",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
USER_ERROR = [
    "Traceback (most recent call last):",
    '  File "/work/retro_ray/training/pretrain.py", line 120, in train_loop_per_worker',
    "    raise ValueError('bad batch')",
    "ValueError: bad batch",
]


def test_ray_trains_harmless_tracebacks_stay_off_the_terminal_and_real_ones_stay_on():
    ours_line = "2026-11-29 12:00:00,000 retro_ray INFO train pretrain step 2/2"
    ours, failing = worker_lines([ours_line, *CLEANER, *RESOURCE_REQUEST])
    assert ours == [ours_line] and failing == []

    ours, failing = worker_lines([*CLEANER, *USER_ERROR, *RESOURCE_REQUEST, "ERROR the run failed"])
    assert failing == [*USER_ERROR, "ERROR the run failed"]

    chained = [*USER_ERROR, "", "During handling of the above exception, another exception occurred:", "", *USER_ERROR]
    assert worker_lines(chained)[1] == chained  # a real traceback is shown whole
