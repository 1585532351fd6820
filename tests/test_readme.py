"""README.md: within its size budget, and true to the code it describes.

Every `alignpipe` and `make` command in the README's shell blocks is accounted for: the cheap ones (`alignpipe
check`, `--help`) run here; the ones that need a GPU, Kubernetes or a remote Ray cluster carry a `# needs ...`
comment and the config they use passes the checks `alignpipe run` makes before it starts; every other one is listed
in RUN_ELSEWHERE with the test file or Makefile target that runs it, and that file or target must hold it. A command
added to the README that nothing runs fails here. Besides: every `alignpipe` subcommand and option the README names
exists, every `make` target too, every config key written as `section.key` (and its value, where one is given)
passes the schema, every YAML block passes `alignpipe check` merged into the shipped pipelines.yaml, relative links
resolve, and `make bench` still finds the markers it writes the benchmark table between.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from alignpipe.cli.main import app
from testlib import PIPELINES, REPO
from typer.main import get_command
from typer.testing import CliRunner

from alignpipe.config import load_checked, load_pipeline
from alignpipe.config.base import Section
from alignpipe.config.pipeline import PipelineConfig, ray_is_remote

README = REPO / "README.md"
MAX_BYTES = 25_000
TEXT = README.read_text(encoding="utf-8")
SHELL = {"bash", "sh", "shell", "console"}

# README command (as shlex.join writes it, env assignments left out) -> where it runs: (file, text the file holds),
# or ("Makefile:<target>", text that target's recipe holds). Every entry must hold, and be in the README.
RUN_ELSEWHERE: dict[str, list[tuple[str, str]]] = {
    "make demo": [("Makefile:demo", "alignpipe run demo")],
    "make test": [("Makefile:test", "pytest"), (".ci/run", "make test")],
    "make up": [("Makefile:up", "alignpipe up"), ("tests/cli/test_ops.py", '_cli("up", "--workdir"')],
    "make down": [("Makefile:down", "alignpipe down"), ("tests/cli/test_ops.py", '_cli("down", "--workdir"')],
    "alignpipe run demo": [("Makefile:demo", "alignpipe run demo"), ("bench/any_cpu.py", '"run", "demo"')],
    # bench/run.py runs the demo with --set overrides (workdir, rlhf); the README's own overrides pass the
    # config checks below
    "alignpipe run demo --set sft.learning_rate=1e-4 --set sft.max_steps=100":
        [("bench/run.py", '"run", "demo", "--set"')],
    # against the local stack's servers (local_stack.env)
    "alignpipe run smoke": [("tests/flows/test_concurrent.py", '"run", "smoke", "--config"')],
    "alignpipe models contact-card-extractor": [("tests/cli/test_registry.py", 'cli(mlflow_uri, "models", NAME)')],
    "alignpipe promote contact-card-extractor 3 --reason reviewed":
        [("tests/cli/test_registry.py", 'cli(mlflow_uri, "promote", NAME, "3", "--reason"')],
    "alignpipe rollback contact-card-extractor": [("tests/cli/test_registry.py", 'cli(mlflow_uri, "rollback", NAME)')],
    "alignpipe gc contact-card-extractor --keep 5": [("tests/cli/test_registry.py", '"gc", NAME, "--keep"')],
    "alignpipe env": [("tests/cli/test_ops.py", '_cli("env", "--workdir"')],
    "alignpipe status": [("tests/cli/test_ops.py", '_cli("status", "--workdir"')],
    # the two calls `alignpipe deploy` makes, against the local stack's Prefect server
    "alignpipe deploy": [("tests/flows/test_deploy.py", "apply_deployments(build_deployments(path))")],
    "alignpipe deploy --serve": [("tests/flows/test_deploy.py", '"deploy", "--serve", "--config"')],
    "alignpipe deploy --prefect-yaml prefect.yaml":
        [("tests/flows/test_deploy_source.py", '"deploy", "--config", str(PIPELINES), "--prefect-yaml"')],
}
NEEDS = ("needs a GPU", "needs Kubernetes", "needs a Ray cluster")
PLACEHOLDER = re.compile(r"<([A-Za-z][\w-]*)>")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "--"}


@dataclass
class Command:
    tool: str                      # alignpipe | make
    args: list[str]
    line: str                      # the README line it is on
    comment: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return shlex.join([self.tool, *self.args])


def fenced_blocks(text: str = TEXT) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m["lang"], m["body"]) for m in re.finditer(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```", text,
                                                         re.MULTILINE | re.DOTALL)]


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing `# comment` (a `#` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def _segments(tokens: list[str]) -> list[list[str]]:
    """Simple commands of a tokenized line: split at separators, `$(...)` substitutions parsed as their own."""
    out, current = [], []
    for tok in tokens:
        if tok.startswith("$(") and tok.endswith(")"):
            out += _segments(shlex.split(tok[2:-1]))
        elif tok in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(tok)
    return [seg for seg in [*out, current] if seg]


def shell_lines(body: str) -> list[str]:
    """Logical lines: a trailing backslash continues the line."""
    return body.replace("\\\n", " ").splitlines()


def parse_shell(text: str = TEXT) -> tuple[list[Command], list[tuple[str, str, dict[str, str]]]]:
    """Every `alignpipe` and `make` command of the shell blocks, with the variables exported before it in the block
    and those assigned in front of it; and every other line that runs something, with its comment and variables."""
    found, lines = [], []
    for lang, body in fenced_blocks(text):
        if lang not in SHELL:
            continue
        exported: dict[str, str] = {}
        for line in shell_lines(body):
            code, comment = split_comment(line)
            if not code.strip():
                continue
            for seg in _segments(shlex.split(code)):
                if seg[0] == "export":
                    exported.update(a.split("=", 1) for a in seg[1:] if ASSIGNMENT.match(a))
                    continue
                env = dict(exported)
                while seg and ASSIGNMENT.match(seg[0]):
                    env.update([seg.pop(0).split("=", 1)])
                if seg and seg[0] in ("alignpipe", "make"):
                    found.append(Command(seg[0], seg[1:], line, comment, env))
                elif seg:
                    lines.append((line, comment, env))
    return found, lines


def commands(text: str = TEXT) -> list[Command]:
    return parse_shell(text)[0]


def required_marker(line: str, env: dict[str, str]) -> str | None:
    """What a shell line needs beyond this machine, judged from its text."""
    if re.search(r"\bkubectl\b|\bhelm\b", line):
        return "needs Kubernetes"
    if "gpu-check" in line or re.search(r"use_gpu=true|quantized_base=|bnb_", line):
        return "needs a GPU"
    if re.search(r"\bray (start|job submit)\b", line) or ray_is_remote(resolve(env.get("RAY_ADDRESS"))):
        return "needs a Ray cluster"
    return None


def resolve(value: str | None) -> str | None:
    """`<head>:6379` -> `head:6379`: placeholders become plain names, so the config checks see a remote address."""
    return None if value is None else PLACEHOLDER.sub(r"\1", value)


def makefile_targets() -> dict[str, str]:
    """Makefile target -> its recipe."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current:
            targets[current] += line.strip() + "\n"
        elif m := re.match(r"^([A-Za-z][\w-]*)\s*:(?!=)", line):
            current = m[1]
            targets.setdefault(current, "")
        elif line and not line.startswith("#"):
            current = None
    return targets


def cli_options() -> dict[str, set[str]]:
    """alignpipe subcommand -> its option names (and --help)."""
    group = get_command(app)
    return {name: {"--help", *(o for p in cmd.params for o in [*p.opts, *p.secondary_opts] if o.startswith("-"))}
            for name, cmd in group.commands.items()}


def inline_spans(text: str = TEXT) -> list[tuple[int, str]]:
    """(paragraph number, text) of every inline code span outside the fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [(i, m[1]) for i, para in enumerate(prose.split("\n\n")) for m in re.finditer(r"`([^`\n]+)`",
                                                                                          para.replace("\n", " "))]


def set_overrides(cmd: Command) -> list[str]:
    return [cmd.args[i + 1] for i, a in enumerate(cmd.args[:-1]) if a == "--set"]


def assert_run_config_passes(cmd: Command) -> None:
    """The checks `alignpipe run` makes before starting anything: pipeline, --set overrides, environment."""
    pipeline = cmd.args[1]
    env = {k: resolve(v) for k, v in cmd.env.items()}
    load_checked(PIPELINES, pipeline, [resolve(s) for s in set_overrides(cmd)], env=env)


# ---------------------------------------------------------------------------------------------------------------


def test_the_readme_fits_its_budget():
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes; the budget is {MAX_BYTES}"


def test_the_readme_has_the_two_command_quick_start():
    quick = TEXT.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [(_, body)] = fenced_blocks(quick)
    assert [c.key for c in commands(quick)] == ["make demo", "make test"], body


def test_the_parser_finds_commands_in_every_shape():
    text = ("```bash\nexport RAY_ADDRESS=<head>:6379\neval \"$(alignpipe env)\"   # a comment\n"
            "X=1 alignpipe run smoke --set a.b='c d'  # needs a Ray cluster\n"
            "ray job submit --address http://h:8265 -- alignpipe run demo\nmake up && make down\n```\n")
    found = commands(text)
    assert [c.key for c in found] == ["alignpipe env", "alignpipe run smoke --set 'a.b=c d'", "alignpipe run demo",
                                      "make up", "make down"]
    assert found[1].env == {"RAY_ADDRESS": "<head>:6379", "X": "1"} and found[1].comment == "needs a Ray cluster"
    assert set_overrides(found[1]) == ["a.b=c d"]


def test_lines_that_need_a_gpu_kubernetes_or_a_cluster_say_so():
    found, others = parse_shell()
    for line, comment, env in [*((c.line, c.comment, c.env) for c in found), *others]:
        marker = required_marker(line, env)
        assert marker is None or marker in comment, f"{line!r}: mark it with `# {marker}`"


def test_every_command_runs_here_or_is_marked_or_runs_elsewhere(monkeypatch):
    """Cheap commands run for real; the rest are marked as needing what this machine lacks, or are mapped."""
    monkeypatch.chdir(REPO)
    found = commands()
    assert found, "no commands found in the README's shell blocks"
    targets = makefile_targets()
    options = cli_options()
    unaccounted = []
    for cmd in found:
        if cmd.tool == "make":
            assert cmd.args and cmd.args[0] in targets, f"{cmd.line!r}: no such Makefile target"
        else:
            assert cmd.args and cmd.args[0] in options, f"{cmd.line!r}: no such alignpipe command"
            unknown = {a.split("=")[0] for a in cmd.args if a.startswith("-")} - options[cmd.args[0]]
            assert not unknown, f"{cmd.line!r}: `alignpipe {cmd.args[0]}` has no option {sorted(unknown)}"
            if cmd.args[0] == "run":
                assert_run_config_passes(cmd)
        if cmd.tool == "alignpipe" and (cmd.args[0] == "check" or "--help" in cmd.args):
            result = CliRunner().invoke(app, cmd.args, terminal_width=200)
            assert result.exit_code == 0, f"{cmd.line!r} failed here:\n{result.output}"
            if cmd.args[0] == "check":
                assert "invalid" not in result.output, result.output
        elif any(need in cmd.comment for need in NEEDS):
            continue  # cannot run here; its config passed above
        elif cmd.key not in RUN_ELSEWHERE:
            unaccounted.append(cmd.key)
    assert not unaccounted, (f"README commands that nothing runs: {unaccounted}; run them in a test (or `make bench`) "
                             "and add them to RUN_ELSEWHERE, or mark what they need")


@pytest.mark.parametrize("command", sorted(RUN_ELSEWHERE))
def test_each_mapped_command_is_in_the_readme_and_where_it_is_said_to_run(command):
    assert command in {c.key for c in commands()}, f"{command!r} is no longer in the README: drop it from RUN_ELSEWHERE"
    targets = makefile_targets()
    for where, needle in RUN_ELSEWHERE[command]:
        if where.startswith("Makefile:"):
            target = where.split(":", 1)[1]
            assert target in targets, f"no Makefile target {target!r}"
            assert needle in targets[target], f"Makefile target {target!r} does not run {needle!r}"
        else:
            path = REPO / where
            assert path.is_file(), f"{where} is gone"
            assert needle in path.read_text(), f"{where} no longer holds {needle!r}"


def test_every_subcommand_named_has_help_and_every_option_named_exists():
    """Inline mentions too: `alignpipe run --verbose`, `alignpipe promote --force` ..."""
    options = cli_options()
    named = {c.args[0] for c in commands() if c.tool == "alignpipe"}
    for _, span in inline_spans():
        words = span.split()
        if words[0] == "alignpipe" and len(words) > 1:
            assert words[1] in options, f"`{span}`: no such alignpipe command"
            unknown = {w.split("=")[0] for w in words[2:] if w.startswith("-")} - options[words[1]]
            assert not unknown, f"`{span}`: `alignpipe {words[1]}` has no option {sorted(unknown)}"
            named.add(words[1])
        if words[0] == "make" and len(words) > 1:
            assert words[1] in makefile_targets(), f"`{span}`: no such Makefile target"
    for sub in sorted(named):
        result = CliRunner().invoke(app, [sub, "--help"], terminal_width=200)
        assert result.exit_code == 0, f"alignpipe {sub} --help:\n{result.output}"


def _key_exists(parts: list[str]) -> bool:
    model = PipelineConfig
    for part in parts:
        if model is None:
            return False  # a key under a plain value (dicts such as compute.resources are written as values)
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        if part not in fields:
            return False
        annotation = fields[part].annotation
        subs = [a for a in (getattr(annotation, "__args__", None) or (annotation,))
                if isinstance(a, type) and issubclass(a, Section)]
        model = subs[0] if subs else None
    return True


def test_every_config_key_and_value_in_the_prose_passes_the_schema():
    """`section.key` spans name real keys; `section.key: value` spans, taken together per paragraph, validate on
    the demo pipeline."""
    top = {f.alias or name for name, f in PipelineConfig.model_fields.items()}
    by_paragraph: dict[int, dict[str, object]] = {}
    for para, span in inline_spans():
        m = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)+)(?:\s*[:=]\s*(.+))?", span)
        if not m or m[1].split(".")[0] not in top:
            continue
        assert _key_exists(m[1].split(".")), f"`{span}`: no config key {m[1]!r}"
        if m[2] is not None and not PLACEHOLDER.search(m[2]) and "..." not in m[2]:
            by_paragraph.setdefault(para, {})[m[1]] = yaml.safe_load(m[2])
    assert by_paragraph, "no `section.key: value` spans found: the pattern no longer matches the README"
    for overrides in by_paragraph.values():
        load_pipeline(PIPELINES, "demo", overrides, env={})


def _demo_copy(role: str) -> Path:
    return REPO / "data" / "demo" / {"sft": "sft_train.jsonl", "eval": "sft_heldout.jsonl",
                                     "preference": "pref_train.jsonl", "preference_eval": "pref_heldout.jsonl"}[role]


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("index", range(sum(lang == "yaml" for lang, _ in fenced_blocks())))
def test_every_yaml_block_passes_check_merged_into_the_shipped_file(index, tmp_path):
    """A block with `pipelines:` is merged into pipelines.yaml as it is; any other block into its `defaults:`.
    Data files a new pipeline names are stood in for by the demo's."""
    body = [body for lang, body in fenced_blocks() if lang == "yaml"][index]
    block = yaml.safe_load(body)
    shipped = yaml.safe_load(PIPELINES.read_text())
    merged = _merge(shipped, block if "pipelines" in block else {"defaults": block})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(REPO / "data" / "demo")
    for pipe in merged["pipelines"].values():
        for role, source in ((pipe or {}).get("data") or {}).items():
            if isinstance(source, dict) and not (tmp_path / source["path"]).exists():
                (tmp_path / source["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(_demo_copy(role), tmp_path / source["path"])
    config = tmp_path / "pipelines.yaml"
    config.write_text(yaml.safe_dump(merged, sort_keys=False))
    result = CliRunner().invoke(app, ["check", "--config", str(config)], terminal_width=250)
    assert result.exit_code == 0 and "invalid" not in result.output, f"{body}\n{result.output}"


def test_relative_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_make_bench_still_finds_its_markers():
    """bench/run.py rewrites what lies between these two markers (MARK_BEGIN, MARK_END)."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    source = (REPO / "bench" / "run.py").read_text()
    assert f'"{begin}"' in source and f'"{end}"' in source, "bench/run.py's markers changed: update this test"
    assert TEXT.count(begin) == 1 and TEXT.count(end) == 1 and TEXT.index(begin) < TEXT.index(end)
