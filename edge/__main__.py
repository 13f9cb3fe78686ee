"""`python -m edge`: serve the HTTP API with uvicorn on the configured host and port."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from edge.app import create_app
from services.common.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    uvicorn.run(
        create_app(config),
        host=config.edge.host,
        port=config.edge.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
