"""alignpipe.storage: the same round trips on a local folder and on a real S3 API server (moto in server mode, driven
by the real pyarrow and boto3 clients): a file, a model folder replaced by a new one, an incomplete folder, Ray
Train's storage arguments."""

import os
from pathlib import Path

from types import SimpleNamespace

import pytest

from alignpipe.errors import ConfigError
from alignpipe.storage import COMPLETE, Storage, join


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The local stack's S3 service alone (moto in server mode on 127.0.0.1), with a bucket."""
    from alignpipe.cli import stack

    root = tmp_path_factory.mktemp("s3")
    server = stack.start_s3(root, stack.free_port())
    stack.save(stack.Stack(workdir=str(root), services=[server]))
    try:
        env = stack.s3_env(server.url, stack.s3_credentials(root))
        stack.wait_s3(server, "store", env, 120)

        def client():
            import boto3

            return boto3.client("s3", endpoint_url=server.url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

        yield SimpleNamespace(endpoint=server.url, bucket="store", env=env, client=client)
    finally:
        stack.down(root, grace=2)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch):
    if request.param == "local":
        return Storage.of(str(tmp_path / "store"), str(tmp_path))
    server = request.getfixturevalue("s3")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return Storage.of(f"s3://{server.bucket}/{tmp_path.name}", str(tmp_path))


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_file_and_folder_round_trip(storage, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    model = _folder(tmp_path / "model", {"config.json": b"{}", "model.safetensors": os.urandom(300_000),
                                         "tokenizer/vocab.json": b"{}"})
    file_uri = storage.publish(data, storage.uri("stages", "validate", "k1", "train.jsonl"))
    dir_uri = storage.publish(model, storage.uri("stages", "sft", "k2", "adapter"))
    assert storage.remote == file_uri.startswith("s3://")
    assert storage.exists(file_uri) and storage.exists(dir_uri)
    assert not storage.exists(storage.uri("stages", "sft", "other"))

    cache = tmp_path / "node-cache"  # what another node would download into
    got_file, got_dir = Path(storage.fetch(file_uri, cache)), Path(storage.fetch(dir_uri, cache))
    assert got_file.read_text() == data.read_text()
    assert sorted(p.relative_to(got_dir).as_posix() for p in got_dir.rglob("*") if p.is_file()) == \
        ["config.json", "model.safetensors", "tokenizer/vocab.json"]
    assert (got_dir / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert storage.read_text(file_uri) == data.read_text()
    assert storage.read_text(storage.write_text(join(dir_uri + "-meta", "quantize.json"), "{}")) == "{}"


def test_publishing_again_replaces_the_folder(storage, tmp_path):
    uri = storage.uri("stages", "quantize", "k", "quantized")
    storage.publish(_folder(tmp_path / "v1", {"a.bin": b"1", "old.bin": b"stale"}), uri)
    storage.publish(_folder(tmp_path / "v2", {"a.bin": b"2"}), uri)
    got = Path(storage.fetch(uri, tmp_path / "fresh-node"))
    assert sorted(p.name for p in got.iterdir()) == ["a.bin"] and (got / "a.bin").read_bytes() == b"2"


def test_a_folder_without_its_completion_marker_is_not_there(s3, tmp_path, monkeypatch):
    """An upload cut short (the marker is written last) is neither `exists` nor fetched half."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    storage = Storage.of(f"s3://{s3.bucket}/partial", str(tmp_path))
    uri = storage.publish(_folder(tmp_path / "m", {"w.bin": b"x"}), storage.uri("merged"))
    storage.filesystem().delete_file(f"{s3.bucket}/partial/merged{COMPLETE}")
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="not in object storage"):
        storage.fetch(uri, tmp_path / "cache")


def test_fetched_copies_are_kept_per_node(s3, tmp_path, monkeypatch):
    """Stage folders are content-keyed, so a node keeps what it downloaded: a second fetch reads no object."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    storage = Storage.of(f"s3://{s3.bucket}/kept", str(tmp_path))
    uri = storage.publish(_folder(tmp_path / "m", {"w.bin": b"x"}), storage.uri("base"))
    first = storage.fetch(uri, tmp_path / "cache")
    storage.filesystem().delete_dir_contents(f"{s3.bucket}/kept")
    assert storage.fetch(uri, tmp_path / "cache") == first


def test_local_paths_and_hub_ids_pass_through(tmp_path):
    storage = Storage.of(None, str(tmp_path))
    assert storage.root == str(tmp_path.resolve()) and not storage.remote
    assert storage.fetch("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert storage.ray_storage() == (str(tmp_path.resolve() / "ray_results"), None)


def test_ray_train_gets_a_bucket_path_and_a_filesystem_for_s3(s3, monkeypatch):
    """Ray Train takes a custom endpoint as `bucket/prefix` plus an explicit pyarrow filesystem (no scheme)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://wrong.invalid:1")
    storage = Storage.of(f"s3://{s3.bucket}/p/", "/unused", endpoint=s3.endpoint)  # the explicit endpoint wins
    path, filesystem = storage.ray_storage()
    assert path == f"{s3.bucket}/p/ray_results" and type(filesystem).__name__ == "S3FileSystem"
    for key, value in s3.env.items():
        if key != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(key, value)
    with filesystem.open_output_stream(f"{path}/probe.txt") as f:  # reaches the server it was given
        f.write(b"ok")
    assert s3.client().get_object(Bucket=s3.bucket, Key="p/ray_results/probe.txt")["Body"].read() == b"ok"


@pytest.mark.parametrize("root, message", [("gs://b/p", "local folder or s3://"), ("s3://", "name the bucket")])
def test_unsupported_storage_paths_are_refused(root, message):
    with pytest.raises(ConfigError, match=message):
        Storage.of(root, "/w")
