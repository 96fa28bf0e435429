"""Every command the README shows is checked here: `mome` commands (in code blocks and inline) parse with the
CLI's own parser and their config and overrides load; `python -m jobs.X` commands name a job module whose
stage parses the same way; `make` targets exist; `ray` / `serve` CLI commands use flags the installed Ray
has; every `curl` request body validates against its endpoint's request model; every key of the options
table exists in the settings. (The commands themselves run in the tests of their stages and in CI's `make test`.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLACEHOLDERS = {"C": "configs/small.yaml", "RUN_DIR": "runs/small", "DIR": "/tmp/source", "HEAD:6379": "127.0.0.1:6379"}


def block_lines(text: str) -> list[str]:
    """Command lines of the fenced shell blocks (not ```python); comments and `[optional]` parts dropped."""
    lines, shell = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            shell = (line.strip() == "```") if shell is None else None
            continue
        if shell and line.strip():
            cmd = re.split(r"\s{2,}#", line)[0].strip()
            lines.append(re.sub(r"\s*\[--[^\]]*\]", "", cmd))
    return lines


def inline_commands(text: str) -> list[str]:
    return [c for c in re.findall(r"`([^`]+)`", text) if re.match(r"(\.venv/bin/)?mome \w", c)]


def argv_of(cmd: str) -> list[str]:
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd)]
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0][len(".venv/bin/"):]
    return words


COMMANDS = [argv_of(c) for c in block_lines(README) + inline_commands(README)]
KNOWN = ("mome", "ray", "python", "make", "curl", "serve", "pip")


def by_program(program: str) -> list[list[str]]:
    return [a for a in COMMANDS if a[0] == program]


def test_every_command_is_of_a_known_kind():
    assert COMMANDS, "no command found in the README"
    unknown = [" ".join(a) for a in COMMANDS if a[0] not in KNOWN]
    assert not unknown, f"README commands no test checks: {unknown}"


def check_mome(argv: list[str]) -> None:
    """Parse a `mome ...` argv as the CLI does and load its config with its overrides."""
    from mome_ray import cli
    from mome_ray.settings import load_settings

    if argv[0] == "serve":
        from serve import launch

        args = cli.parse_args(launch._parser(), argv[1:])
        load_settings(args.config or "configs/small.yaml", args.overrides)
        return
    args = cli.parse_args(cli._parser(), argv)
    if getattr(args, "config", None):
        assert (ROOT / args.config).is_file(), f"no preset {args.config}"
        load_settings(str(ROOT / args.config), args.overrides)


@pytest.mark.parametrize("argv", by_program("mome"), ids=lambda a: " ".join(a)[:80])
def test_mome_command_parses_and_its_config_loads(argv):
    check_mome(argv[1:])


def job_stage(module: str) -> list[str]:
    """A job module's stage words: `main(['sweep', 'kd', *sys.argv[1:]])` -> ['sweep', 'kd']."""
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"no job module {module}"
    found = re.search(r"main\(\[(.*?)\*sys\.argv", path.read_text())
    assert found, f"{module} does not hand its arguments to mome_ray.cli.main"
    return [w.strip(" '\"") for w in found.group(1).split(",") if w.strip()]


JOB_COMMANDS = [a[a.index("-m") + 1:] for a in COMMANDS if "-m" in a and a[a.index("-m") + 1].startswith("jobs.")]


@pytest.mark.parametrize("argv", JOB_COMMANDS, ids=lambda a: " ".join(a)[:80])
def test_job_command_parses_and_its_config_loads(argv):
    check_mome([*job_stage(argv[0]), *argv[1:]])


def test_every_listed_job_module_exists():
    listed = re.search(r"`python -m jobs\.<name>` \(([^)]*)\)", README)
    assert listed, "the README lists the job modules"
    names = re.findall(r"`(\w+)`", listed.group(1))
    assert names and all((ROOT / "jobs" / f"{n}.py").is_file() for n in names), names


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for argv in by_program("make"):
        for target in argv[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
    demo = re.search(r"^demo:.*\n\t.*cli (pipeline .*)$", makefile, re.M)
    check_mome(demo.group(1).replace("$(PRESET)", "small").split())


@cache
def cli_help(*words: str) -> str:
    exe = Path(sys.executable).parent / words[0]
    out = subprocess.run([str(exe), *words[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def flags(argv: list[str]) -> list[str]:
    return [w.split("=")[0] for w in argv if w.startswith("--")]


@pytest.mark.parametrize("argv", by_program("ray") + by_program("serve"), ids=lambda a: " ".join(a)[:80])
@pytest.mark.timeout(240)
def test_ray_and_serve_commands_use_flags_the_installed_cli_has(argv):
    words = argv[:2] if argv[1] != "job" else argv[:3]
    ours = flags(argv[:argv.index("--")] if "--" in argv else argv)
    text = cli_help(*words)
    missing = [f for f in ours if f not in text]
    assert not missing, f"`{' '.join(words)}` has no {missing}"
    if "--" in argv:
        assert argv[argv.index("--") + 1] == "python"


def test_pip_commands_pin_the_projects_torch():
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for argv in by_program("pip") + [a for a in COMMANDS if a[0].endswith("pip")]:
        assert f"torch=={pinned}" in argv


def test_curl_bodies_are_valid_requests():
    from serve import api

    models = {"route": api.RouteRequest, "score": api.ScoreRequest, "generate": api.GenerateRequest,
              "completions": api.CompletionRequest}
    routes = set(re.findall(r'@app\.(?:get|post)\("(/[^"]+)"', (ROOT / "serve" / "http.py").read_text()))
    curls = by_program("curl")
    assert curls
    for argv in curls:
        url = next(w for w in argv if w.startswith("localhost"))
        path = "/" + url.split("/", 1)[1]
        assert path in routes, f"README shows {path}; the app serves {sorted(routes)}"
        if "-d" in argv:
            body = json.loads(argv[argv.index("-d") + 1])
            models[path.rsplit("/", 1)[1]].model_validate(body)


def option_keys() -> list[str]:
    section = README.split("Options a user reaches for most:")[1].split("\n\n")[1]
    keys = []
    for row in section.splitlines()[2:]:
        first = row.split("|")[1]
        prev = None
        for key in re.findall(r"`([^`]+)`", first):
            key = prev.rsplit(".", 1)[0] + key if key.startswith(".") and prev else key
            keys.append(key)
            prev = key
    return keys


def test_options_table_names_real_keys():
    from mome_ray.settings import load_settings

    cfg = load_settings(str(ROOT / "configs/small.yaml"))
    keys = option_keys()
    assert len(keys) > 10
    for key in keys:
        node = cfg if not key.startswith("scaling.") else cfg.teacher  # `scaling` is in every trained section
        for part in key.split("."):
            assert hasattr(node, part), f"README option {key}: no '{part}'"
            node = getattr(node, part)


def test_no_placeholder_is_left():
    for word in ("DEMO_TIME", "RESULTS_SUMMARY", "TODO", "TBD"):
        assert word not in README, f"README still says {word}"
