"""README.md says what the program does: its set-up commands are `./run`'s, CI runs its test
command, and its "Commands" and "mount options" tables name exactly the options each command
has, with the defaults `--help` shows."""

import re
import shlex
from pathlib import Path

import click
import pytest

from fuseclone.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*|-[a-zA-Z])\b")


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the rows of the first table under HEADING (its header rows left out)."""
    section = README.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if rows and not line.startswith("|"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows[2:]


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option)
            for name in param.opts + param.secondary_opts} - {"-h", "--help"}


def commands_rows() -> dict[str, list[str]]:
    """Each command's row of the Commands table, by command name."""
    return {re.match(r"`fuseclone (\w+)", cells[0]).group(1): cells
            for cells in table_rows("## Commands")}


def test_the_commands_table_names_every_command():
    assert set(commands_rows()) == set(main.commands)


@pytest.mark.parametrize("name", sorted(set(main.commands) - {"mount"}))
def test_a_commands_row_names_exactly_its_options(name):
    """Every option of the command is in its row; every option in the row's usage exists."""
    usage, description = commands_rows()[name]
    options = option_names(main.commands[name])
    assert options <= set(OPTION.findall(usage + " " + description)), f"{name}: options missing"
    assert set(OPTION.findall(usage)) <= options, f"{name}: options that do not exist"


def test_the_mount_options_table_names_exactly_mounts_options():
    mount = main.commands["mount"]
    rows = table_rows("### `mount` options")
    assert set().union(*(OPTION.findall(cells[0]) for cells in rows)) == option_names(mount)
    for param in mount.params:
        if isinstance(param, click.Option) and param.show_default and isinstance(param.default, str):
            row = next(cells for cells in rows if param.opts[-1] in OPTION.findall(cells[0]))
            assert param.default in row[1], f"{param.opts[-1]}: default {param.default} not in {row[1]}"


def test_the_set_up_commands_are_runs_and_ci_runs_the_test_command():
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["./run demo", "./run test"]
    run = (ROOT / "run").read_text()
    offered = set(re.findall(r"^\s+(\w+)\)", run, re.MULTILINE))
    assert {command.split()[1] for command in commands} <= offered
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == ["exec ./run test"]
    packages = shlex.split(re.search(r"^APT_PACKAGES=\((.*)\)", run, re.MULTILINE).group(1))
    set_up_note = README.split("```", 3)[2].split("\n\n", 2)[1]
    assert [p for p in packages if p not in set_up_note] == []


def test_the_metrics_table_names_every_metric():
    from fuseclone.metrics import METRICS, UP

    table = " ".join(cells[0] for cells in table_rows("### Running clones as services"))
    assert [m.name for m in (UP, *METRICS) if f"`{m.name}`" not in table] == []


def test_architecture_names_every_module_and_only_modules_that_exist():
    """docs/ARCHITECTURE.md's table: each module of the package in a row of its own or its
    package's (`sources/`, `nbd/`), and each name in its first column a file or package."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    package = ROOT / "fuseclone"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", " ".join(row.split(" | ")[0] for row in rows)))
    assert [name for name in named if not (package / name).exists()] == []
    listed = {str(path.relative_to(package)) for path in package.rglob("*.py")
              if path.name != "__init__.py" and "__pycache__" not in path.parts}
    mentioned = set(re.findall(r"`([\w/]+\.py)`", text))
    missing = [module for module in sorted(listed)
               if module not in mentioned and Path(module).name not in mentioned
               and f"{Path(module).parent}/" not in named]
    assert missing == []
