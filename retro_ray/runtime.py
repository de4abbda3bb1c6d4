"""Process set-up shared by every stage: logging and joining (or starting) Ray."""

from __future__ import annotations

import logging
import os

from retro_ray.config import Config

log = logging.getLogger("retro_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


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
    log.info("ray: %s", ray.cluster_resources())
