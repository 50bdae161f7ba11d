"""Kept so that ``python -m bnsweep.server`` works as before; the command is ``bnsweep ui / bnsweep down``."""

from bnsweep.tracking.server import main

if __name__ == "__main__":
    main()
