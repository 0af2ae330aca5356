"""Every command the README and the docs show still works as shown (issue 30: nothing the README
promised may be lost when it moved into docs/). The commands are read out of the Markdown itself:
shell blocks (`sh`, `console` prompts) and inline code that starts with a program, in README.md,
docs/*.md and the files the site includes whole (BENCHMARKS.md, CHANGELOG.md, examples/README.md).
Each is checked by what it is:

- `make X VAR=...`: X is a Makefile target, VAR a variable the Makefile reads; the flags in
  SERVE_ARGS / BENCH_ARGS are the launcher's / the benchmark's, the markers in PYTEST_ARGS are
  registered;
- `python -m M ...`, `esm2 SUB ...`, `esm2-server ...` (the package's scripts): the module's
  `--help` runs (so it imports and parses) and lists every flag shown; `python -c CODE`: CODE
  compiles and its imports import; `python FILE`: the file exists;
- `pip install 'esm2-service[EXTRA]'`: the extra is declared;
- `curl`: the URL's path is one the gateway serves (the OpenAPI document's paths, the proto's
  http rules, which the docs page and the playground are among), and a `-d` body is JSON;
- `kubectl`/`kustomize`, `docker`/`podman`, `grpcurl`: the files and directories they name exist,
  and the test that runs such a command for real says so (test_deploy, test_image, test_operations).

A program with no check here fails the test, so a new kind of command in the docs needs one.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
           REPO / "BENCHMARKS.md", REPO / "CHANGELOG.md", REPO / "examples" / "README.md"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = {name: target.split(":")[0] for name, target in PYPROJECT["project"]["scripts"].items()}
PROGRAMS = {"make", "python", "python3", "esm2", *SCRIPTS, "pip", "curl", "grpcurl", "kubectl", "kustomize",
            "docker", "podman"}
# Commands of the shell itself or of the base system, shown around ours (a pipe into `head`).
STANDARD = {"head", "tar", "git", "cd"}
# Programs whose commands are run for real by a test, which must say so: (test file, text in it).
RUN_BY_TESTS = {
    "kubectl": ("test_deploy.py", '[kubectl, "kustomize", str(overlay)]'),
    "kustomize": ("test_deploy.py", '[kubectl, "kustomize", str(overlay)]'),
    "docker": ("test_image.py", 'str(REPO / "deploy" / "Dockerfile")'),  # the same image, built and run with podman
    "podman": ("test_image.py", 'PODMAN = shutil.which("podman")'),
    "grpcurl": ("test_operations.py", "def test_reflection_describes_the_api"),
}
# Variables whose value is flags for one module, as the Makefile passes them on.
FLAG_VARIABLES = {"SERVE_ARGS": "gateway.launch", "BENCH_ARGS": "bench.run"}
# The launcher passes every server flag on to the servers it starts.
ALSO_ACCEPTS = {"gateway.launch": "service.server"}
FLAG = re.compile(r"(?<![\w/.=-])(--?[A-Za-z][\w-]*)")
PROGRAM = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(" + "|".join(re.escape(p) for p in sorted(PROGRAMS, key=len, reverse=True))
                     + r")\s")


@dataclass(frozen=True)
class Shown:
    source: str
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _block_lines(lang: str, body: str) -> list[str]:
    """A shell block's commands: continuations joined, quotes balanced across lines, prompts and
    comments dropped."""
    body = re.sub(r"\\\n\s*", " ", body)
    commands, pending = [], ""
    for line in body.splitlines():
        if lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending)
        pending = ""
    return commands


def shown_commands() -> list[Shown]:
    found = []
    for source in SOURCES:
        name, text = str(source.relative_to(REPO)), source.read_text()
        for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            if block.group(1) in ("sh", "console", "bash", "shell"):
                found += [Shown(name, c) for c in _block_lines(block.group(1), block.group(2))]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        found += [Shown(name, span) for span in re.findall(r"`([^`\n]+)`", prose) if PROGRAM.match(span)]
    return found


def segments(command: str) -> list[str]:
    """One command line's commands: split at ` | `, `&&`, `;` and parentheses outside quotes
    (`tiny|wide` in a synopsis is one word); comments and leading variable assignments dropped."""
    parts, current, quote, i = [], "", None, 0
    while i < len(command):
        char = command[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif command.startswith(" | ", i) or command.startswith("&&", i) or char in ";()":
            parts.append(current)
            current, i = "", i + (3 if command.startswith(" | ", i) else 2 if char == "&" else 1)
            continue
        current += char
        i += 1
    parts.append(current)
    return [re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", part.strip()) for part in parts if part.strip()]


def words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


# ---- what each program's command is checked against ------------------------------------------

@functools.cache
def help_text(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"python -m {module} {' '.join(args)} --help: {result.stderr[-2000:]}"
    text = result.stdout
    if module in ALSO_ACCEPTS:
        text += help_text(ALSO_ACCEPTS[module])
    return text


def flags_missing(shown: str, help_output: str) -> list[str]:
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_output))
    return sorted({f for f in FLAG.findall(shown) if f not in listed})


@functools.cache
def makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = {t for line in re.findall(r"(?m)^([\w .$()/-]+?)\s*&?:(?!=)", text) for t in line.split()}
    variables = set(re.findall(r"\$\((\w+)\)", text)) | set(re.findall(r"(?m)^(\w+)\s*[?:]?=", text))
    return targets, variables


@functools.cache
def served_paths() -> list[re.Pattern]:
    document = json.loads((REPO / "service" / "api" / "openapi.json").read_text())
    # The proto's http rules are what Envoy's transcoder routes (the health and docs routes are
    # not in the OpenAPI document).
    rules = re.findall(r'(?:get|post): "([^"]+)"', (REPO / "protos" / "esm" / "v1" / "esm2.proto").read_text())
    paths = [re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p.rstrip("/"))) for p in [*document["paths"], *rules]]
    return [re.compile(f"{p}/?") for p in paths]


def check_make(argv: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = []
    for word in argv[1:]:
        name, assign, value = word.partition("=")
        if not assign:
            problems += [] if word in targets else [f"no Makefile target {word!r}"]
            continue
        if name not in variables:
            problems.append(f"the Makefile reads no variable {name}")
        elif name in FLAG_VARIABLES:
            problems += [f"{FLAG_VARIABLES[name]} has no {f}" for f in flags_missing(value, help_text(FLAG_VARIABLES[name]))]
        elif name == "PYTEST_ARGS":
            markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
            expression = words(value)[words(value).index("-m") + 1] if "-m" in words(value) else ""
            problems += [f"no marker {m!r}" for m in re.findall(r"\w+", expression) if m not in markers | {"not", "and", "or"}]
    return problems


def check_python(argv: list[str], text: str) -> list[str]:
    if argv[1:] in (["-m"], ["-c"]):  # prose naming the option ("each `python -m` module"), no command
        return []
    if argv[1] == "-m":
        module = argv[2]
        return [f"python -m {module} has no {f}" for f in flags_missing(text.split(module, 1)[1], help_text(module))]
    if argv[1] == "-c":
        tree = ast.parse(argv[2])  # a SyntaxError fails the test with the code shown
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                if missing:
                    return [f"{node.module} has no {missing}"]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
        return []
    return [] if (REPO / argv[1]).is_file() else [f"no file {argv[1]}"]


def check_esm2(argv: list[str], text: str) -> list[str]:
    commands = set(re.findall(r"(?m)^    (\w+)  ", help_text("esm2_client.cli")))
    sub = next((w for w in argv[1:] if not w.startswith("-")), None)
    if sub is None:
        return [f"esm2 has no {f}" for f in flags_missing(text, help_text("esm2_client.cli"))]
    if sub not in commands:
        return [f"esm2 has no command {sub!r} (it has {sorted(commands)})"]
    return [f"esm2 {sub} has no {f}" for f in flags_missing(text.split(sub, 1)[1], help_text("esm2_client.cli", sub))]


def check_pip(argv: list[str]) -> list[str]:
    if argv[1] not in ("install", "wheel", "config"):
        return [f"pip {argv[1]}: not a command these docs use"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    problems = []
    for requirement in argv[2:]:
        name, _, listed = requirement.partition("[")
        if name == PYPROJECT["project"]["name"]:
            problems += [f"no extra {e!r}" for e in listed.rstrip("]").split(",") if listed and e not in extras]
    return problems


def check_curl(argv: list[str]) -> list[str]:
    problems = []
    for word in argv[1:]:
        if word.startswith(("localhost", "http://localhost", "127.0.0.1")):
            path = "/" + word.split("/", 1 + word.startswith("http") * 2)[-1].split("?")[0]
            if not any(p.fullmatch(path) for p in served_paths()):
                problems.append(f"the gateway serves no {path}")
    if "-d" in argv:
        try:
            json.loads(argv[argv.index("-d") + 1])
        except ValueError as exc:
            problems.append(f"-d body is not JSON: {exc}")
    return problems


def check_run_by_tests(argv: list[str]) -> list[str]:
    test_file, evidence = RUN_BY_TESTS[argv[0]]
    problems = [] if evidence in (REPO / "tests" / test_file).read_text() else [f"tests/{test_file} runs no {argv[0]}"]
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-f", "-k") and not (REPO / value).exists():
            problems.append(f"no {value}")
    return problems


def problems_of(segment: str) -> list[str]:
    argv = words(segment)
    program = argv[0]
    if program in STANDARD:
        return []
    if program == "make":
        return check_make(argv)
    if program in ("python", "python3"):
        return check_python(argv, segment)
    if program == "esm2":
        return check_esm2(argv, segment)
    if program in SCRIPTS:
        module = SCRIPTS[program]
        return [f"{program} has no {f}" for f in flags_missing(segment.split(program, 1)[1], help_text(module))]
    if program == "pip":
        return check_pip(argv)
    if program == "curl":
        return check_curl(argv)
    if program in RUN_BY_TESTS:
        return check_run_by_tests(argv)
    return [f"no check for the program {program!r}"]


def test_the_docs_show_the_commands_this_test_reads():
    shown = shown_commands()
    texts = {s.text for s in shown}
    assert len(shown) > 150, len(shown)
    # One of each kind, from the places the README's promises moved to.
    for expected in ("make demo", "make test PYTEST_ARGS='-m unit'", "esm2 score --sequence SEQ --mutations A23G K45R:A2C",
                     "python -m service.server --help", "kubectl apply -k deploy/k8s/overlays/cpu   # esm2-8m on CPU, namespace esm2"):
        assert expected in texts, expected
    assert any(t.startswith("curl -s localhost:8080/api/v3/esm2-8m/score/") and '"R10K"' in t for t in texts)


@pytest.mark.slow  # about 20 `--help` runs, several importing torch
def test_every_command_the_docs_show_works_as_shown():
    problems = [f"{shown}: {problem}" for shown in shown_commands()
                for segment in segments(shown.text) for problem in problems_of(segment)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("segment,problem", [
    ("make no-such-target", "no Makefile target 'no-such-target'"),
    ("make serve SERVE_ARGS='--no-such-flag'", "gateway.launch has no --no-such-flag"),
    ("make test PYTEST_ARGS='-m nosuchmarker'", "no marker 'nosuchmarker'"),
    ("python -m service.config --no-such-flag", "python -m service.config has no --no-such-flag"),
    ("python -c 'from esm2_client import NoSuchClient'", "esm2_client has no ['NoSuchClient']"),
    ("esm2 embed x.fasta --no-such-flag", "esm2 embed has no --no-such-flag"),
    ("esm2 nosuchcommand", "esm2 has no command 'nosuchcommand'"),
    ("pip install 'esm2-service[nosuchextra]'", "no extra 'nosuchextra'"),
    ("curl -s localhost:8080/api/v3/esm2-8m/nosuchaction/ -d '{}'", "the gateway serves no /api/v3/esm2-8m/nosuchaction/"),
    ("curl -s localhost:8080/api/v3/esm2-8m/encode/ -d '{items: []}'", "-d body is not JSON"),
    ("kubectl apply -k deploy/k8s/overlays/nosuch", "no deploy/k8s/overlays/nosuch"),
    ("wget http://example.org", "no check for the program 'wget'"),
])
def test_a_command_that_no_longer_works_is_named(segment, problem):
    found = problems_of(segment)
    assert any(f.startswith(problem) for f in found), found


# ---- the files the docs name --------------------------------------------------------------------

REPO_PATH = re.compile(r"`((?:service|gateway|esm2_client|esm2_wire|tests|bench|deploy|protos|harness|examples|docs|\.ci)"
                       r"/[\w./-]*(?:::\w+)?)`")


def missing_files(source: str, text: str) -> list[str]:
    """Repository paths in `text`'s inline code (`tests/test_cli.py::test_x` names a test in a
    file) that name nothing: neither a file, a folder nor a path git ignores (made at run time)."""
    missing = []
    for named in sorted(set(REPO_PATH.findall(text))):
        path, _, function = named.partition("::")
        target = REPO / path
        if not target.exists():
            ignored = any(subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO).returncode == 0
                          for name in (path, path.rstrip("/") + "/"))  # `bench/.cache/` ignores a folder
            missing += [] if ignored else [f"{source}: no {path}"]
        elif function and not re.search(rf"(?m)^\s*(?:async )?def {function}\(", target.read_text()):
            missing.append(f"{source}: no test {function} in {path}")
    return missing


def test_every_file_the_docs_name_exists():
    named = {source: source.read_text() for source in SOURCES}
    assert sum(len(REPO_PATH.findall(text)) for text in named.values()) > 100
    assert not [m for source, text in named.items() for m in missing_files(str(source.relative_to(REPO)), text)]


def test_a_file_or_test_that_is_gone_is_named():
    text = "`service/engine/no_such_module.py`, `tests/test_cli.py::test_no_such_test`, `bench/.cache/x.pt`"
    assert missing_files("page.md", text) == ["page.md: no service/engine/no_such_module.py",
                                              "page.md: no test test_no_such_test in tests/test_cli.py"]
