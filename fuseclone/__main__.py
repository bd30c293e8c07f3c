"""`python -m fuseclone`, and the installed `fuseclone` command (`run`)."""

import sys


def run() -> None:
    if sys.argv[1:2] == ["mount"]:  # first thing: the files it will load, asked of the disk
        from .startup_files import read_ahead

        read_ahead()
    from .cli import main

    main(prog_name="fuseclone")  # `python -m fuseclone` too: its usage and _FUSECLONE_COMPLETE


if __name__ == "__main__":
    run()
