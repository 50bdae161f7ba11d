"""``python -m bnsweep <command>``: the same as the ``bnsweep`` command."""

from bnsweep.cli import main

main()
