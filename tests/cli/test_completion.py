"""Shell completion, as README tells users to set it up: click's completion scripts for bash
and zsh, and the _FUSECLONE_COMPLETE protocol those scripts speak."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_fuseclone(env, *args):
    return subprocess.run([sys.executable, "-m", "fuseclone", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, check=True).stdout


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _fuseclone_completion fuseclone"),
                                           ("zsh", "#compdef fuseclone")])
def test_completion_scripts_are_generated(shell, marker):
    assert marker in run_fuseclone({"_FUSECLONE_COMPLETE": f"{shell}_source"})


def test_completing_a_command_and_an_option_prefix():
    complete = {"_FUSECLONE_COMPLETE": "bash_complete", "COMP_CWORD": "1"}
    assert run_fuseclone({**complete, "COMP_WORDS": "fuseclone li"}).split() == ["plain,list"]
    assert run_fuseclone({**complete, "COMP_WORDS": "fuseclone mount --metr", "COMP_CWORD": "2"}
                         ).split() == ["plain,--metrics-listen"]
    assert run_fuseclone({**complete, "COMP_WORDS": "fuseclone mount --overw", "COMP_CWORD": "2"}
                         ).split() == ["plain,--overwrite-dst"]
    zsh = run_fuseclone({"_FUSECLONE_COMPLETE": "zsh_complete", "COMP_WORDS": "fuseclone me",
                         "COMP_CWORD": "1"}).splitlines()
    assert [zsh[i + 1] for i in range(0, len(zsh), 3)] == ["message", "metrics"]


def test_bash_completes_through_the_generated_script(tmp_path):
    """The script as bash sources it and calls it (command, word, previous word), with a
    `fuseclone` on PATH that runs this checkout."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "fuseclone").write_text(f'#!/bin/sh\nexec {sys.executable} -m fuseclone "$@"\n')
    (bindir / "fuseclone").chmod(0o755)
    script = ('source <(_FUSECLONE_COMPLETE=bash_source fuseclone)\n'
              'COMP_WORDS=(fuseclone un); COMP_CWORD=1; _fuseclone_completion fuseclone un fuseclone\n'
              'echo "${COMPREPLY[@]}"\n')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["unmount"]
