"""The measurement lab: accuracy sets (``python -m lab.evaluate``), benchmarks (``python -m
lab.bench``) and the harness both they and the tests drive the real app with (``browser``: the
app in headless Chromium; ``compose_project``: a throwaway ``docker compose`` stack).

The lab imports the product; the product (app, utils, model, db, feedback, train and its data
modules) never imports the lab, and the Docker image leaves this folder out.
"""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the caller binds it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
