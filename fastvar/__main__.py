"""``python -m fastvar``: the command line, also as torchrun runs it (``torchrun -m fastvar sample ...``)."""

from fastvar.cli import main

main()
