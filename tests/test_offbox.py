"""The `offbox` fixture (tests/offbox.py) really shares nothing: a task on the worker node reads none of the files the
driver wrote, yet runs the installed code and reaches S3 through the standard variables; a driver in a subprocess
joins the cluster by its GCS address."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from offbox import RESOURCE
from testlib import REPO

import alignpipe

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

# A driver of its own (this process may hold the in-process Ray of `ray_local`): it joins the cluster at RAY_ADDRESS,
# checks that it sees the planted files itself, and runs one task on the worker node's resource.
PROBE = """
import json, os, sys
import ray

spec = json.loads(sys.argv[1])
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)

def readable(path):
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False

@ray.remote(num_cpus=1, resources={spec["resource"]: 1})
def look(spec):
    import boto3  # endpoint, keys and region from the node's environment, as pipeline code gets them
    import alignpipe

    body = boto3.client("s3").get_object(Bucket=spec["bucket"], Key=spec["key"])["Body"].read().decode()
    return {"planted": {p: readable(p) for p in spec["planted"]}, "visible": {p: readable(p) for p in spec["visible"]},
            "alignpipe": alignpipe.__file__, "s3": body, "mnt_ns": os.readlink("/proc/self/ns/mnt"),
            "node": ray.get_runtime_context().get_node_id()}

print(json.dumps({"driver": {p: readable(p) for p in spec["planted"]}, "worker": ray.get(look.remote(spec)),
                  "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}))
"""


def _plant(folder: Path, tag: str) -> str:
    path = folder / f".offbox-planted-{tag}"
    path.write_text("only the driver's disk has this")
    return str(path)


def test_the_worker_node_reads_s3_and_the_installed_code_but_none_of_the_drivers_files(offbox, tmp_path, tiny_model):
    tag = uuid.uuid4().hex[:8]
    key = f"probe/{tag}.txt"
    offbox.s3_client().put_object(Bucket=offbox.bucket, Key=key, Body=b"from the driver, through S3")
    data = REPO / "data"
    planted = [_plant(offbox.workdir, tag), _plant(tmp_path, tag), _plant(Path("/tmp"), tag)]
    planted.append(str(Path(tiny_model) / "config.json"))  # the tiny model the pipeline tests train
    try:
        planted.append(_plant(data, tag))
        visible = [sys.executable, alignpipe.__file__, str(REPO / "pyproject.toml")]
        spec = {"resource": RESOURCE, "bucket": offbox.bucket, "key": key, "planted": planted, "visible": visible}
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True,
                              env=offbox.driver_env(), timeout=120, check=False)
    finally:
        for path in planted:
            if ".offbox-planted-" in path:
                Path(path).unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    worker = seen["worker"]

    assert all(seen["driver"].values()), seen["driver"]  # the driver reads every planted file ...
    assert not any(worker["planted"].values()), worker["planted"]  # ... the worker node none of them
    assert all(worker["visible"].values()), worker["visible"]
    assert worker["alignpipe"] == alignpipe.__file__
    assert worker["s3"] == "from the driver, through S3"
    # the task ran in the worker node's namespace, on the node that holds the resource; the head has no CPU to lend
    assert worker["mnt_ns"] == os.readlink(f"/proc/{offbox.worker_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert seen["nodes"][worker["node"]].get(RESOURCE)
    assert [r.get("CPU", 0) for n, r in seen["nodes"].items() if n != worker["node"]] == [0]


def test_namespace_pids_are_the_worker_nodes_processes(offbox):
    pids = offbox.namespace_pids()
    assert offbox.worker_pid in pids and os.getpid() not in pids
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids if Path(f"/proc/{pid}/comm").exists()}
    assert "raylet" in names, names


def test_aws_env_is_set_only_inside_the_block(offbox):
    before = {key: os.environ.get(key) for key in offbox.env}
    with offbox.aws_env():
        import boto3

        assert boto3.client("s3").head_bucket(Bucket=offbox.bucket)  # nothing but the standard variables
    assert {key: os.environ.get(key) for key in offbox.env} == before
