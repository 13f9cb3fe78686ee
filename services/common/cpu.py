"""What `auto` means for the chat engine on this machine: how many chat workers `ark up` starts, how many CPU threads
each uses, and how many sequences each decodes together.

llama.cpp's threads spin while they wait for each other, so processes whose threads together outnumber the cores
stall one another: on 2 cores, two chat workers decoding at once with 2 threads each took 5.6 to 10.5 times as long
as one alone, while with 1 thread each they took about as long as one alone (bench/cpu_share.py). `ark up`
therefore tells each chat worker how many share the machine; in a container or a pod a worker has its CPUs to
itself.

The defaults were measured on 2 cores: 2 workers x 1 thread x 16 sequences (issue 21, bench/batching.py). `auto`
keeps exactly that there and scales it:

- workers: one per core up to 4 cores, then one per 2 cores, at most 8. Workers side by side scale with the cores
  (each decodes on its own), while one worker's threads meet at every layer of every step, so on a small machine a
  worker per core gives the most tokens. On larger ones 2 threads per worker keep a batched step short without
  multiplying the processes, their KV memory and the conversations spread over them; past 8 workers, threads grow
  instead (and the workers' ports, from 50051, stay below the embeddings service's 50061);
- sequences: 16 per decoding thread, at most 64. A worker with more threads runs the same batched step in less
  time, so it takes more sequences at the same rate per stream; 64 bounds the KV cells of the running sequences
  (1,024 each).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# How many chat workers `ark up` runs on this machine (it sets this for each of them).
WORKERS_ON_HOST_ENV = "ARK_CHAT_WORKERS_ON_HOST"
MAX_AUTO_WORKERS = 8
SEQUENCES_PER_THREAD = 16
MAX_AUTO_SEQUENCES = 64


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def auto_workers(cores: int | None = None) -> int:
    """Chat workers for `cores` CPUs (default: this process's): one per core up to 4, then one per 2, at most 8."""
    cores = cpus() if cores is None else cores
    return max(1, cores if cores <= 4 else min(MAX_AUTO_WORKERS, cores // 2))


def auto_threads(env: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may run on, shared by the chat workers on this machine (at least one each)."""
    env = os.environ if env is None else env
    workers = max(1, int(env.get(WORKERS_ON_HOST_ENV) or 1))
    return max(1, cpus() // workers)


def auto_sequences(threads: int) -> int:
    """Sequences one worker decodes together with `threads` decoding threads: 16 per thread, at most 64."""
    return max(1, min(MAX_AUTO_SEQUENCES, SEQUENCES_PER_THREAD * threads))
