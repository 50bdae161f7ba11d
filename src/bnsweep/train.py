"""Kept so that ``python -m bnsweep.train`` works as before; the command is ``bnsweep train``."""

from bnsweep.training.run import main

if __name__ == "__main__":
    main()
