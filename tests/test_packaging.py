"""The built wheel: one top-level import package, every module of the repository in it, cache keys that follow the
code installed from it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testlib import REPO

# repository folder -> where its modules live in the wheel
LAYOUT = {"alignpipe": "alignpipe", "tasks": "alignpipe/tasks", "flows": "alignpipe/flows", "cli": "alignpipe/cli"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the sources as they are: building in place would leave build/ and egg-info in the repository
    src = out / "src"
    for folder in LAYOUT:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    [built] = out.glob("alignpipe-*.whl")
    return built


def test_the_wheel_has_one_top_level_package_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"alignpipe", wheel.name.split("-py3")[0] + ".dist-info"}
    for folder, inside in LAYOUT.items():
        for module in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in module.parts:
                assert f"{inside}/{module.relative_to(REPO / folder).as_posix()}" in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "alignpipe = alignpipe.cli.main:app" in entry_points


def test_the_repository_keys_a_stage_by_its_module_and_the_shared_training_module():
    from alignpipe.runs import code_files

    for stage in ("sft", "align"):
        files = code_files(stage)
        assert REPO / "tasks" / f"{stage}.py" in files and REPO / "alignpipe" / "training.py" in files
        assert not [f for f in files if f.parent.name in ("flows", "cli") or (f.parent.name == "tasks" and
                                                                              f.stem != stage)]


def test_editing_the_shared_training_module_changes_sft_and_align_keys_in_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (f"import sys; sys.path.insert(0, {str(site)!r}); from alignpipe.runs import code_files, code_version; "
             "assert str(code_files('sft')[-1]).startswith(sys.path[0]), code_files('sft')[-1]; "
             "print(code_version('sft'), code_version('align'), code_version('quantize'))")

    def keys() -> list[str]:
        return subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                              cwd=tmp_path).stdout.split()

    before = keys()
    with (site / "alignpipe" / "training.py").open("a") as f:
        f.write("\n# edited\n")
    after = keys()
    assert before[0] != after[0] and before[1] != after[1]
    with (site / "alignpipe" / "tasks" / "sft.py").open("a") as f:
        f.write("\n# edited\n")
    again = keys()
    assert again[0] != after[0] and again[1:] == after[1:]  # the sft module keys sft only
