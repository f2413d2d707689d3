"""One GPU exporter per Ray node, discoverable by Prometheus, and the replicas' report of their GPUs.

- `ensure_gpu_exporters()` (idempotent; launch.py and the app call it) starts a small supervisor actor
  on the head node. Every `reconcile_interval_s` it makes sure each alive GPU node (or, on a cluster
  without GPUs, the head) runs one exporter actor, and rewrites a Prometheus file_sd target file, the
  way Ray writes prom_metrics_service_discovery.json for its own metrics agents.
- `report_replica_gpus()`, called in a GPU replica's __init__, tells its node's exporter which GPUs
  the replica holds (for turbo_gpu_replica_info). It creates that exporter if the supervisor has not
  yet, so a replica that starts first is not lost.
Actors are detached and take no CPU, so they outlive the driver that started them and never compete
with replicas for scheduling.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from turbo_serve.metrics.gpu_exporter import DEFAULT_PORT, GpuExporter, ReplicaHolding
from turbo_serve.metrics.nvml import GpuRef, visible_gpu_refs

logger = logging.getLogger(__name__)

NAMESPACE = "turbo_serve"
SUPERVISOR_NAME = "turbo-gpu-exporter-supervisor"
EXPORTER_NAME_PREFIX = "turbo-gpu-exporter-"
SD_FILE_NAME = "turbo_gpu_service_discovery.json"
"""Written next to Ray's own prom_metrics_service_discovery.json, in Ray's temp root on the head."""


@dataclass(frozen=True)
class GpuExporterSettings:
    port: int = DEFAULT_PORT
    """Exporter port on every node; 0 picks a free one per node (tests), the file_sd file has it."""
    host: str = "node"
    """Address to bind: "node" for the node's Ray IP (scrapable from the head), or a literal address
    such as 127.0.0.1 (single-node) or 0.0.0.0."""
    sd_file: str = ""
    """file_sd target file; empty for <Ray temp root>/turbo_gpu_service_discovery.json on the head."""
    reconcile_interval_s: float = 15.0
    """How often the supervisor looks for new nodes and rewrites the target file."""


def exporter_name(node_id: str) -> str:
    return EXPORTER_NAME_PREFIX + node_id


def _bind_address(host: str) -> str:
    return ray.util.get_node_ip_address() if host == "node" else host


def _ray_temp_root() -> str:
    return ray._private.worker.global_worker.node.get_temp_dir_path()


def write_service_discovery(path: str, targets: dict[str, str]) -> None:
    """Atomically (os.replace) write file_sd JSON: one group per node, labelled with its Ray node id,
    so Prometheus never reads a half-written file."""
    groups = [{"targets": [address], "labels": {"ray_node_id": node_id}} for node_id, address in sorted(targets.items())]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(groups, f, indent=1)
    os.replace(tmp, path)


class _ExporterActor:
    """Holds one GpuExporter on its node."""

    def __init__(self, host: str, port: int) -> None:
        self.exporter = GpuExporter(host=_bind_address(host), port=port)
        self.exporter.start()

    def address(self) -> str:
        host, port = self.exporter.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def register_replica(self, holding: dict) -> None:
        holding = dict(holding)
        holding["gpus"] = tuple(GpuRef(**g) for g in holding["gpus"])
        self.exporter.register_replica(ReplicaHolding(**holding))


def _exporter_handle(node_id: str, settings: GpuExporterSettings):
    """The node's exporter actor, created pinned to that node if it does not exist yet."""
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(_ExporterActor)
    return actor_cls.options(
        name=exporter_name(node_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(settings.host, settings.port)


def exporter_nodes() -> list[str]:
    """Alive nodes with GPUs; on a cluster with none, just the head (it then reports no GPU present)."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    gpu_nodes = [n["NodeID"] for n in alive if n["Resources"].get("GPU", 0) > 0]
    if gpu_nodes:
        return gpu_nodes
    return [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]][:1]


class _Supervisor:
    def __init__(self, settings: dict) -> None:
        self.settings = GpuExporterSettings(**settings)
        self.sd_file = self.settings.sd_file or os.path.join(_ray_temp_root(), SD_FILE_NAME)
        self._lock = threading.Lock()
        self._targets: dict[str, str] = {}
        threading.Thread(target=self._loop, name="gpu-exporter-reconcile", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.settings.reconcile_interval_s)
            try:
                self.reconcile()
            except Exception:  # the loop must outlive a node that vanished mid-call
                logger.exception("GPU exporter reconcile failed; retrying in %ss", self.settings.reconcile_interval_s)

    def reconcile(self) -> dict[str, str]:
        """Start missing exporters, drop dead nodes, rewrite the target file; returns node -> address."""
        with self._lock:
            handles = {node: _exporter_handle(node, self.settings) for node in exporter_nodes()}
            addresses = dict(zip(handles, ray.get([h.address.remote() for h in handles.values()], timeout=60)))
            if addresses != self._targets or not os.path.exists(self.sd_file):
                write_service_discovery(self.sd_file, addresses)
                self._targets = addresses
            return dict(addresses)

    def service_discovery_file(self) -> str:
        return self.sd_file


def ensure_gpu_exporters(settings: GpuExporterSettings | None = None) -> tuple[str, dict[str, str]]:
    """Start (or find) the supervisor and reconcile once; returns (file_sd path, node id -> address).
    Idempotent: a second call, from another process too, finds the running supervisor."""
    settings = settings or GpuExporterSettings()
    head = _head_node()
    supervisor = (
        ray.remote(num_cpus=0, max_restarts=-1)(_Supervisor)
        .options(
            name=SUPERVISOR_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=True),
        )
        .remote(asdict(settings))
    )
    targets = ray.get(supervisor.reconcile.remote(), timeout=120)
    return ray.get(supervisor.service_discovery_file.remote()), targets


def _head_node() -> str:
    for node in ray.nodes():
        if node["Alive"] and "node:__internal_head__" in node["Resources"]:
            return node["NodeID"]
    raise RuntimeError("no alive head node in ray.nodes()")


def stop_gpu_exporters() -> None:
    """Kill the supervisor and every exporter (detached actors survive ray.shutdown() of a driver
    attached to a long-lived cluster, so tests and `turbo-serve serve` teardown call this)."""
    names = [SUPERVISOR_NAME] + [exporter_name(n["NodeID"]) for n in ray.nodes()]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue


def report_replica_gpus(settings: GpuExporterSettings | None = None) -> bool:
    """Tell this node's exporter which GPUs this Serve replica holds. Returns False outside a replica,
    for a replica without GPUs, or when the report failed: it never raises, because a replica must
    serve even when its metrics cannot be reported (the failure is logged)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return False
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        return False
    try:
        holding = ReplicaHolding(
            pid=os.getpid(),
            application=context.app_name or "",
            deployment=context.deployment,
            replica=context.replica_tag,
            gpus=tuple(visible_gpu_refs(gpu_ids)),
        )
        exporter = _exporter_handle(ray.get_runtime_context().get_node_id(), settings or GpuExporterSettings())
        ray.get(exporter.register_replica.remote(asdict(holding)), timeout=60)
    except Exception:
        logger.warning("could not report GPUs %s to the node's GPU exporter", gpu_ids, exc_info=True)
        return False
    logger.info("reported GPUs %s of %s/%s to the node's exporter", gpu_ids, holding.deployment, holding.replica)
    return True
