"""deploy/serve_config.multi_gpu.yaml: Serve's schema, agreement with the settings the code derives the
placement groups from, and a GPU budget that fits one node of 8 with the fractions on one GPU."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from turbo_serve.parallel.distributed import NVLINK_MULTICAST_OFF
from turbo_serve.settings import Settings, denoiser_name

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.multi_gpu.yaml"
NODE_GPUS = 8


def application() -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    return app


def test_deployments_agree_with_the_settings():
    app = application()
    settings = Settings(**app["args"])
    entries = {d["name"]: d for d in app["deployments"]}
    assert set(entries) == {"Ingress", "TextEncoder", "VAE"} | {denoiser_name(m) for m in settings.models}
    assert app["runtime_env"]["env_vars"] == NVLINK_MULTICAST_OFF
    for model in settings.models:
        name = denoiser_name(model)
        code = settings.deployment_options(name)
        assert entries[name].get("placement_group_bundles") == code.get("placement_group_bundles"), name
        assert entries[name].get("placement_group_strategy") == code.get("placement_group_strategy"), name
        for key in ("num_cpus", "num_gpus"):  # bundle 0 holds the replica itself
            assert entries[name]["ray_actor_options"][key] == code["ray_actor_options"][key], (name, key)
    assert settings.parallel_config("wan2.1-t2v-14b").sequence_parallel == 4
    assert settings.parallel_config("wan2.1-t2v-1.3b").world_size == 1


def test_gpu_budget_fits_one_node_with_the_fractions_on_one_gpu():
    whole = fractional = 0.0
    for entry in application()["deployments"]:
        replicas = entry.get("autoscaling_config", {}).get("max_replicas", entry.get("num_replicas", 1))
        bundles = entry.get("placement_group_bundles") or [{"GPU": entry["ray_actor_options"]["num_gpus"]}]
        gpus = replicas * sum(b.get("GPU", 0) for b in bundles)
        if all(b.get("GPU", 0) >= 1 for b in bundles):
            whole += gpus
        else:
            fractional += gpus
    assert whole == NODE_GPUS - 1 and 0 < fractional <= 1.0, (whole, fractional)
