"""How many CPU threads an engine on this machine should use when its configuration says `auto`.

llama.cpp's threads spin while they wait for each other, so processes whose threads together outnumber the cores
stall one another: on 2 cores, two chat workers decoding at once with 2 threads each took 5.6 to 10.5 times as long
as one alone, while with 1 thread each they took about as long as one alone (bench/cpu_share.py). `ark up`
therefore tells each chat worker how many share the machine; in a container or a pod a worker has its CPUs to
itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# How many chat workers `ark up` runs on this machine (it sets this for each of them).
WORKERS_ON_HOST_ENV = "ARK_CHAT_WORKERS_ON_HOST"


def auto_threads(env: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may run on, shared by the chat workers on this machine (at least one each)."""
    env = os.environ if env is None else env
    workers = max(1, int(env.get(WORKERS_ON_HOST_ENV) or 1))
    return max(1, len(os.sched_getaffinity(0)) // workers)
