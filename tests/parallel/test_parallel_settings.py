"""Per-deployment parallelism in the settings: what Serve is asked for, and the refused layouts."""

import pytest
from pydantic import ValidationError

from turbo_serve.parallel.distributed import NVLINK_MULTICAST_OFF, ParallelConfig
from turbo_serve.settings import Settings


def test_one_model_sequence_parallel_next_to_data_parallel_replicas():
    settings = Settings(
        models=["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"],
        device="cuda",
        deployments={
            "Denoiser": {"num_cpus": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
            "Denoiser-wan2.1-t2v-14b": {"sequence_parallel": 4, "autoscaling": None},
        },
    )
    small = settings.deployment_options("Denoiser-wan2.1-t2v-1.3b")
    assert "placement_group_bundles" not in small and small["autoscaling_config"]["max_replicas"] == 3
    large = settings.deployment_options("Denoiser-wan2.1-t2v-14b")
    assert large["placement_group_bundles"] == [{"CPU": 2, "GPU": 1.0}] * 4
    assert large["placement_group_strategy"] == "STRICT_PACK"
    assert large["ray_actor_options"]["num_cpus"] == 2 and large["ray_actor_options"]["num_gpus"] == 1.0  # = bundle 0
    assert large["num_replicas"] == 1 and large["max_ongoing_requests"] == 1  # the rest from the Denoiser kind
    assert settings.parallel_config("wan2.1-t2v-14b") == ParallelConfig(sequence_parallel=4)
    assert settings.parallel_config("wan2.1-t2v-1.3b") == ParallelConfig()
    assert settings.denoiser_rank_resources("wan2.1-t2v-14b") == {"CPU": 2, "GPU": 1.0}


def test_cfg_parallel_doubles_the_ranks_and_every_replica_keeps_nvlink_multicast_off():
    settings = Settings(device="cuda", deployments={"Denoiser": {"sequence_parallel": 2, "cfg_parallel": True}})
    options = settings.deployment_options("Denoiser-tiny-t2v")
    assert len(options["placement_group_bundles"]) == 4
    for name in ("Ingress", "TextEncoder", "VAE", "Denoiser-tiny-t2v"):
        assert settings.deployment_options(name)["ray_actor_options"]["runtime_env"] == {"env_vars": NVLINK_MULTICAST_OFF}
    assert NVLINK_MULTICAST_OFF == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                    "NVSHMEM_DISABLE_NVLS": "1"}  # fmt: skip


def test_environment_names_a_model_denoiser(monkeypatch):
    monkeypatch.setenv("TURBO_SERVE_DEPLOYMENTS__DENOISER-TINY-T2V__SEQUENCE_PARALLEL", "2")
    assert Settings().parallel_config("tiny-t2v").sequence_parallel == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"models": ["wan2.1-t2v-1.3b"], "deployments": {"Denoiser": {"sequence_parallel": 5}}},
         r"Denoiser-wan2.1-t2v-1.3b \(wan2.1-t2v-1.3b\): sequence_parallel=5 must divide the model's num_heads=12"
         ".*valid: 1, 2, 3, 4, 6, 12"),
        ({"models": ["wan2.1-t2v-14b"], "deployments": {"Denoiser-wan2.1-t2v-14b": {"sequence_parallel": 3}}},
         "num_heads=40.*valid: 1, 2, 4, 5, 8, 10, 20, 40"),
        ({"deployments": {"VAE": {"sequence_parallel": 2}}}, "Denoiser settings, not VAE's"),
        ({"deployments": {"Denoiser-wan2.1-t2v-14b": {}}}, r"unknown deployment \['Denoiser-wan2.1-t2v-14b'\]"),
        ({"deployments": {"Denoiser": {"sequence_parallel": 0}}}, "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_refused_layouts_name_the_rule(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**kwargs)


def test_a_multi_rank_replica_needs_resources_in_its_bundles():
    settings = Settings(deployments={"Denoiser": {"sequence_parallel": 2, "num_cpus": 0}})
    with pytest.raises(ValueError, match="needs num_cpus or num_gpus > 0 per rank"):
        settings.deployment_options("Denoiser-tiny-t2v")
