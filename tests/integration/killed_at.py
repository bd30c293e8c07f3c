"""The `fuseclone` command, with its process killed (SIGKILL) the first time it reaches a point:

    python killed_at.py [--parent] MODULE:NAME [fuseclone arguments...]

NAME is a function of MODULE, a method (`Class.method`), or `os.CALL`: MODULE's own calls of
that os function (not other modules'). The kill comes as the call is made, before it runs: a
crash at a moment that a signal from outside could only hit by luck. A background mount forks
its daemon from this process, so the daemon has the kill point too. With `--parent`, the
process that reaches the point kills its parent instead (a background mount's daemon kills the
mount command waiting for it) and goes on.
"""

import functools
import importlib
import os
import signal
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _killing(function, parent):
    done = []

    @functools.wraps(function)
    def killed(*args, **kwargs):
        if not done:
            done.append(True)
            os.kill(os.getppid() if parent else os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return killed


def _kill_at(point: str, parent: bool) -> None:
    module_name, name = point.split(":")
    module = importlib.import_module(module_name)
    *owners, attribute = name.split(".")
    if owners == ["os"]:  # the module's own os calls: a copy of os that kills at this one
        copy = types.ModuleType("os")
        copy.__dict__.update(os.__dict__)
        setattr(copy, attribute, _killing(getattr(os, attribute), parent))
        module.os = copy
        return
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, attribute, _killing(getattr(owner, attribute), parent))


if __name__ == "__main__":
    parent = sys.argv[1] == "--parent"
    _kill_at(sys.argv[1 + parent], parent)
    from fuseclone.cli import main

    sys.argv = ["fuseclone", *sys.argv[2 + parent :]]
    main()
