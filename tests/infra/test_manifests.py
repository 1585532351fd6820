"""The vendored schemas the infra tests validate against are the published ones: checksums as recorded in
SOURCES.md, and Ray's cluster-config schema identical to the pinned Ray wheel's."""

import hashlib
import json
import re
from pathlib import Path

from infralib import SCHEMAS, vendored_schema


def test_vendored_schemas_match_their_recorded_checksums():
    """SOURCES.md records where each schema came from and its sha256; a silent edit of a schema fails here."""
    recorded = {}
    for row in (SCHEMAS / "SOURCES.md").read_text().splitlines():
        if m := re.match(r"\| `([\w.-]+\.json)` \|", row):  # a table row; its last sha256 is the vendored file's
            recorded[m.group(1)] = re.findall(r"sha256 `([0-9a-f]{64})`", row)[-1]
    vendored = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert sorted(recorded) == vendored
    for name, digest in recorded.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, name


def test_vendored_ray_schema_is_the_installed_rays():
    """The cluster-config schema ships inside the ray wheel: the vendored copy must be the pinned Ray's."""
    import ray.autoscaler

    installed = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert json.loads(installed.read_text()) == vendored_schema("ray-schema.json")
