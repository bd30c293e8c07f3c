from .cli import main

main(prog_name="fuseclone")  # `python -m fuseclone` too: its usage and _FUSECLONE_COMPLETE
