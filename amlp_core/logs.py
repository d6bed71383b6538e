"""Logging set up in one place: one line format for every process of the product."""

from __future__ import annotations

import logging

FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
#: The product's own packages.
PACKAGES = ("amlp_core", "server", "client", "fedamlp", "simulations")


def setup_logging(level: int = logging.INFO, own_handlers: bool = False) -> None:
    """Log at ``level`` in :data:`FORMAT` to standard error.

    Args:
        own_handlers: give the product's packages a handler of their own and leave the root logger alone
            (inside Flower's processes, which keep their own root handlers); otherwise configure the root
            logger, replacing what an import set there (importing Opacus calls ``basicConfig``, root at
            WARNING, which would hide our INFO lines).
    """
    if not own_handlers:
        logging.basicConfig(force=True, level=level, format=FORMAT, datefmt=DATE_FORMAT)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
