"""The README cannot drift from the code: every command in its bash blocks is checked against the real parsers.

`orpo ...` lines (also after `torchrun ... -m orpo.cli` and `accelerate launch ... -m orpo.cli`) parse with orpo's
own command line; their config files exist and load, and their key=value overrides are valid keys with valid
values. torchrun and accelerate options parse with those tools' own parsers, and `--config_file` files exist.
`./run.sh` commands exist. (The commands themselves run in the other tests where a CPU can run them: the
distributed tests run the torchrun and accelerate lines, test_cli / test_push / test_eval the orpo ones.) The
Architecture section's tree is the package's tree, file for file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orpo.cli import _split_args, parse
from orpo.config import DEMO, load_config
from test_gpu_check import load_check

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"my.yaml", "my-config.yaml", "CONFIG", "CONFIG.yaml", "sweeps/mine/best.yaml"}  # stand for the reader's own file
SPACE_FILES = {"space.yaml"}  # the reader's search space file
VALUES = {"R": "0", "HOST": "10.0.0.1", "$SLURM_NNODES": "2", "$head:29500": "10.0.0.1:29500", "$SLURM_JOB_ID": "7"}


def commands() -> list[str]:
    """Every command line of the README's ```bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def words(line: str) -> list[str]:
    """The line's words without its comment and without optional parts written [like this]."""
    tokens, optional = [], False
    for token in shlex.split(line, comments=True):
        if token.startswith("["):
            optional = True
        if not optional:
            tokens.append(VALUES.get(token, token))
        if token.endswith("]"):
            optional = False
    return tokens


def check_orpo(argv: list[str]) -> None:
    args = parse(argv)
    if args.command == "sweep":
        from orpo.search.space import parse_space

        specs = [spec for spec in args.search if spec not in SPACE_FILES]
        if specs:
            parse_space(specs)
    if args.command in ("train", "data", "sweep"):
        path, overrides = _split_args(args.items)
        if path in PLACEHOLDERS:
            path = None
        elif path is not None:
            assert (ROOT / path).is_file(), f"README names a config that does not exist: {path}"
        load_config(str(ROOT / path) if path else None, overrides, preset=DEMO if path is None else None)


def test_the_readme_has_the_commands_this_test_knows():
    lines = commands()
    assert any(line.startswith("./run.sh demo") for line in lines) and any(line.startswith("orpo train") for line in lines)
    assert any("accelerate launch" in line for line in lines) and any("torchrun" in line for line in lines)


@pytest.mark.parametrize("line", commands())
def test_every_readme_command_parses(line):
    tokens = words(line)
    if tokens[0] == "srun":
        tokens = tokens[1:]
    if tokens[0] == "./run.sh":
        assert f"\n  {tokens[1]})" in (ROOT / "run.sh").read_text(), f"run.sh has no command {tokens[1]}"
        if tokens[1] == "demo":
            load_config(None, tokens[2:], preset=DEMO)
    elif tokens[0] == "orpo":
        check_orpo(tokens[1:])
    elif tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        split = tokens.index("-m")
        get_args_parser().parse_args(tokens[1:split] + ["x.py"])
        assert tokens[split + 1] == "orpo.cli"
        check_orpo(tokens[split + 2 :])
    elif tokens[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        split = tokens.index("-m")
        args = launch_command_parser().parse_args(tokens[2:split] + ["x.py"])
        assert args.config_file is None or (ROOT / args.config_file).is_file(), args.config_file
        assert tokens[split + 1] == "orpo.cli"
        check_orpo(tokens[split + 2 :])
    elif tokens[0] == "bench/gpu/run":
        load_check().parser().parse_args(tokens[1:])
    else:
        # other programs: slurm, pip, python, and ollama (the Modelfile it reads is checked in tests/test_llama_cpp.py)
        assert tokens[0] in ("head=$(scontrol", "pip", "python", "ollama"), f"a README command this test does not know: {line}"



def drawn_tree() -> set[str]:
    """The paths the README's Architecture section draws (`├── name` / `└── name` under `src/orpo/`)."""
    section = (ROOT / "README.md").read_text().split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\nsrc/orpo/\n(.*?)```", section, re.S).group(1)
    found, parents = set(), []
    for line in block.splitlines():
        branch = re.search(r"[├└]── (\S+)", line)
        if not branch:
            continue
        depth = branch.start() // 4
        name = branch.group(1)
        parents[depth:] = [name.rstrip("/")]
        found.add("/".join(parents) + ("/" if name.endswith("/") else ""))
    return found


def test_the_architecture_tree_is_the_package():
    package = ROOT / "src" / "orpo"
    real = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    real |= {p.relative_to(package).as_posix() + "/" for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    drawn = drawn_tree()
    assert drawn == real, f"missing from the README: {sorted(real - drawn)}; not in src/orpo: {sorted(drawn - real)}"
