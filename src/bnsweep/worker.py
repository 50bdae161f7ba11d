"""Kept so that ``python -m bnsweep.worker`` works as before; the command is ``bnsweep worker``."""

from bnsweep.sweep.worker import main

if __name__ == "__main__":
    main()
