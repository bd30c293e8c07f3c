"""The `fuseclone` command, with its process killed (SIGKILL) the first time it reaches a point:

    python killed_at.py MODULE:NAME [fuseclone arguments...]

NAME is a function of MODULE, a method (`Class.method`), or `os.CALL`: MODULE's own calls of
that os function (not other modules'). The kill comes as the call is made, before it runs: a
crash at a moment that a signal from outside could only hit by luck. A background mount forks
its daemon from this process, so the daemon has the kill point too.
"""

import functools
import importlib
import os
import signal
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _killing(function):
    @functools.wraps(function)
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)  # never reached

    return killed


def _kill_at(point: str) -> None:
    module_name, name = point.split(":")
    module = importlib.import_module(module_name)
    *owners, attribute = name.split(".")
    if owners == ["os"]:  # the module's own os calls: a copy of os that kills at this one
        copy = types.ModuleType("os")
        copy.__dict__.update(os.__dict__)
        setattr(copy, attribute, _killing(getattr(os, attribute)))
        module.os = copy
        return
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, attribute, _killing(getattr(owner, attribute)))


if __name__ == "__main__":
    _kill_at(sys.argv[1])
    from fuseclone.cli import main

    sys.argv = ["fuseclone", *sys.argv[2:]]
    main()
