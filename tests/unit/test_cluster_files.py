"""cluster/: the Ray cluster-launcher YAML and the KubeRay RayCluster parse, keep trunk and
experts on separate node groups, and advertise exactly the resources the code requests."""

import json
from pathlib import Path

import pytest
import yaml

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.resources import EXPERT_NODE_RESOURCE, TRUNK_NODE_RESOURCE, actor_options

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def launcher_groups() -> dict[str, dict[str, float]]:
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    return {name: node.get("resources", {}) for name, node in cfg["available_node_types"].items()}


def kuberay_groups() -> dict[str, dict[str, float]]:
    cfg = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert (cfg["apiVersion"], cfg["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cfg["spec"]
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    out = {}
    for name, group in groups.items():
        params = group.get("rayStartParams", {})
        # KubeRay's format: a JSON object inside a quoted string, e.g. '"{\"expert_node\": 8}"'.
        custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        if "num-gpus" in params:
            custom["GPU"] = float(params["num-gpus"])
        out[name] = custom
    return out


@pytest.mark.parametrize("groups", [launcher_groups, kuberay_groups], ids=["launcher", "kuberay"])
def test_custom_resources_match_what_the_code_requests(groups):
    groups = groups()
    custom = {name: set(res) - BUILTIN for name, res in groups.items()}
    # Each custom resource the files advertise is one the code knows, on exactly one group.
    assert custom == {"head": set(), "trunk": {TRUNK_NODE_RESOURCE}, "experts": {EXPERT_NODE_RESOURCE}}
    cfg = ExpertParallelConfig()
    for group, res in (("experts", cfg.expert_resources), ("trunk", cfg.trunk_resources)):
        requested = actor_options(res)["resources"]
        assert set(requested) == custom[group]
        for name, amount in requested.items():
            assert groups[group][name] >= amount  # at least one actor fits on a node


def test_headers_explain_the_placement_resources():
    for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml"):
        header = []
        for line in (CLUSTER / name).read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        text = "\n".join(header)
        assert EXPERT_NODE_RESOURCE in text and TRUNK_NODE_RESOURCE in text
