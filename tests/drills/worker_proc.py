"""An engine worker in a process of its own, for the worker ``kill -9`` drill.

It runs the real ``EngineWorker`` on one pipeline file, as `lastmile up --services
engine` does, with a short ack wait so a killed worker's study is redelivered quickly
(`lastmile up` uses 60 s; the value is a consumer setting, not a code path).

usage: python worker_proc.py NATS_URL STREAM PIPELINE_YAML STATE_DIR WORKER_ID ACK_WAIT_S
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from engine.spec import load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.jetstream import BusSettings, EventBus

SECRET = b"drill-site-secret-0123456789abcdef"


async def main(url: str, stream: str, pipeline: str, state: str, worker_id: str,
               ack_wait_s: float) -> None:
    loaded = load_pipeline(Path(pipeline))
    config = WorkerConfig(instances_dir=Path(state) / "instances",
                          results_dir=Path(state) / "results", secret=SECRET,
                          worker_id=worker_id, max_attempts=3, ack_wait_s=ack_wait_s,
                          heartbeat_s=ack_wait_s / 4)
    bus = await EventBus.connect(BusSettings(servers=(url,), stream=stream))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("worker ready", flush=True)
    try:
        await EngineWorker({loaded.name: loaded}, config).run(bus, stop)
    finally:
        await bus.close()


if __name__ == "__main__":
    url, stream, pipeline, state, worker_id, ack = sys.argv[1:7]
    asyncio.run(main(url, stream, pipeline, state, worker_id, float(ack)))
