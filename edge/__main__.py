"""`python -m edge`: serve the HTTP API with uvicorn on the configured host and port; SIGTERM drains first."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from edge.app import create_app
from edge.drain import Drain, DrainingServer
from edge.http_limits import bounded_protocol
from services.common.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    drain = Drain(config.edge.drain_grace_seconds)
    server_config = uvicorn.Config(
        create_app(config, drain=drain),
        host=config.edge.host,
        port=config.edge.port,
        loop="uvloop",
        # httptools, with bounds on the size and number of request headers (edge/http_limits.py).
        http=bounded_protocol(config.limits),
        access_log=False,
        log_level="warning",
        # The drain has already ended every stream by the time uvicorn shuts down.
        timeout_graceful_shutdown=5,
    )
    DrainingServer(server_config, drain).run()


if __name__ == "__main__":
    main()
