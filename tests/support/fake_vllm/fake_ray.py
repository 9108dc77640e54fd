"""``FAKE_VLLM_RAY=1``: the fake vLLM behaves like vLLM's Ray executor, on real Ray (issue 17).

vLLM with ``--distributed-executor-backend ray`` joins the cluster at ``$RAY_ADDRESS`` as a
driver, asks for a placement group of one bundle per worker (``--pipeline-parallel-size`` x
``--tensor-parallel-size``; one node per pipeline stage here: ``STRICT_SPREAD``), waits for it
(bounded), places a worker actor in each bundle, then loads and serves. When a worker actor dies
(its node is gone) the engine dies (``EngineDeadError``) and the server exits; restarted, it waits
for its placement group again until the node is back. This does the same with a tiny actor per
bundle, so that a group's failure and recovery are real Ray events without a GPU:

- ``FAKE_VLLM_RAY_WAIT_S``: how long to wait for the placement group (default 60), then exit 1.
- ``FAKE_VLLM_RAY_CHECK_S``: seconds between two pings of the workers (default 1).
- ``FAKE_VLLM_RAY_CPUS``: CPUs of each bundle (default 1).

Needs ``ray`` importable by the interpreter (``tests/support/ray_group.py`` makes one).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

#: consecutive ping timeouts (not a definite actor death) that count as a dead engine
TIMEOUTS_DEAD = 3


def enabled() -> bool:
    return os.environ.get("FAKE_VLLM_RAY") == "1"


def world_size(argv: list[str]) -> int:
    """Workers vLLM would place: pipeline stages x tensor-parallel ranks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None)
    args, _ = parser.parse_known_args(argv)
    if args.distributed_executor_backend != "ray":
        sys.exit("fake vllm: FAKE_VLLM_RAY=1 needs --distributed-executor-backend ray")
    return args.pipeline_parallel_size * args.tensor_parallel_size


def say(text: str) -> None:
    print(f"fake vllm: {text}", flush=True)


class RayEngine:
    """The workers of one server: a placement group and an actor per bundle, watched."""

    def __init__(self, size: int):
        self.size = size
        self.wait_s = float(os.environ.get("FAKE_VLLM_RAY_WAIT_S", "60"))
        self.check_s = float(os.environ.get("FAKE_VLLM_RAY_CHECK_S", "1"))
        self.cpus = float(os.environ.get("FAKE_VLLM_RAY_CPUS", "1"))
        self.actors: list = []

    def start(self) -> None:
        """Join the cluster, get the placement group (or exit 1), place the workers."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        address = os.environ.get("RAY_ADDRESS")
        if not address:
            sys.exit("fake vllm: FAKE_VLLM_RAY=1 needs RAY_ADDRESS (the group's head)")
        ray.init(address=address, _node_ip_address=os.environ.get("VLLM_HOST_IP"),
                 log_to_driver=False, logging_level="warning")
        bundles = [{"CPU": self.cpus}] * self.size
        group = placement_group(bundles, strategy="STRICT_SPREAD")
        say(f"waiting up to {self.wait_s:g}s for a placement group of {self.size} bundles "
            f"on {self.size} nodes")
        ready, _ = ray.wait([group.ready()], timeout=self.wait_s)
        if not ready:  # as vLLM: "Cannot provide a placement group ... within N seconds"
            say(f"ValueError: Cannot provide a placement group of {bundles} within "
                f"{self.wait_s:g} seconds")
            sys.exit(1)

        class Worker:  # local: pickled by value, the nodes need not import this module
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()[:12]

            def ping(self) -> bool:
                return True

        worker = ray.remote(num_cpus=self.cpus, max_restarts=0)(Worker)
        self.actors = [worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(self.size)]
        nodes = ray.get([a.node.remote() for a in self.actors], timeout=max(self.wait_s, 30))
        say(f"ray workers on the nodes {', '.join(nodes)}")
        threading.Thread(target=self.watch, name="ray-watch", daemon=True).start()

    def watch(self) -> None:
        """Exit the server when a worker dies, as vLLM's engine does (EngineDeadError)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeouts = 0
        while True:
            time.sleep(self.check_s)
            try:
                ray.get([a.ping.remote() for a in self.actors], timeout=max(5, self.check_s))
                timeouts = 0
                continue
            except RayActorError as exc:
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            except GetTimeoutError:
                timeouts += 1
                if timeouts < TIMEOUTS_DEAD:
                    continue
                why = f"no answer from a worker in {TIMEOUTS_DEAD} pings"
            except Exception as exc:  # noqa: BLE001 - any Ray failure kills the engine
                why = f"{type(exc).__name__}: {exc}"
            say(f"EngineDeadError: a Ray worker of the engine died ({why}); exiting")
            sys.stdout.flush()
            os._exit(1)
