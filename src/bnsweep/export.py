"""Kept so that ``python -m bnsweep.export`` works as before; the command is ``bnsweep export``."""

from bnsweep.deploy.export import main

if __name__ == "__main__":
    main()
