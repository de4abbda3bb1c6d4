"""The cluster files users apply as they are: the launcher YAMLs pass Ray's own schema, the
KubeRay manifests pass the operator's CRD schemas (../shared/kuberay-crds), and every file
offers the node types that the stages' `resources:` ask for."""

from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = ROOT / ".." / "shared" / "kuberay-crds"
LABELS = {"node_cpu", "node_embed", "node_index", "node_train", "node_serve"}
"""The custom resources each kind of node carries; configs/wiki-s3.yaml asks for them."""


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def check_manifest(manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(crd_schema(manifest["kind"])).validate(manifest)


def group_labels(cluster_spec: dict) -> set[str]:
    return {name for group in cluster_spec["workerGroupSpecs"] for name in group.get("resources", {})}


@pytest.mark.parametrize("name", ["aws.yaml", "local-fake.yaml"])
def test_launcher_yamls_pass_rays_own_schema(name):
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(config)
    node_types = config["available_node_types"]
    assert {r for t in node_types.values() for r in t.get("resources", {})} >= LABELS - (
        {"node_serve"} if name == "local-fake.yaml" else set())
    node_types[config["head_node_type"]]["resourcez"] = {"CPU": 0}  # the schema does catch a typo
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_config(config)


def test_kuberay_manifests_pass_the_operators_crd_schemas():
    manifests = {p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}
    assert set(manifests) == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    for manifest in manifests.values():
        check_manifest(manifest)
    cluster = manifests["raycluster.yaml"]["spec"]
    assert cluster["enableInTreeAutoscaling"] and group_labels(cluster) == LABELS
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])  # scaled from zero by the autoscaler
    job = manifests["rayjob.yaml"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == manifests["raycluster.yaml"]["metadata"]["name"]
    assert "jobs/pipeline.py" in job["entrypoint"]
    bad = {**manifests["rayjob.yaml"], "spec": {**job, "backoffLimit": "twice"}}
    with pytest.raises(jsonschema.ValidationError, match="twice"):  # the schema does catch a mistake
        check_manifest(bad)


def test_the_rayservice_deploys_the_serve_app_on_serving_nodes(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from retro_ray.serving.deployments import read_serve_file

    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())["spec"]
    assert group_labels(service["rayClusterConfig"]) == {"node_serve"}
    serve_config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    file = tmp_path / "serve.yaml"
    file.write_text(service["serveConfigV2"])
    spec = read_serve_file(str(file))  # what the app itself accepts from a Serve config
    ours = read_serve_file(str(CLUSTER / "serve.yaml"))
    assert set(spec.deployments) == set(ours.deployments)
    for name in ("Generator", "Retriever"):
        assert spec.deployments[name]["ray_actor_options"]["resources"] == {"node_serve": 1}


def test_the_cluster_config_asks_for_the_node_types_that_the_clusters_offer():
    from retro_ray.core.config import load_config

    cfg = load_config(ROOT / "configs" / "wiki-s3.yaml")
    asked = {name for labels in cfg.resources.model_dump().values() for name in labels}
    assert asked == LABELS
