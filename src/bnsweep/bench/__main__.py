"""``python -m bnsweep.bench``, as before: the same as ``bnsweep bench`` (``make bench``)."""

from bnsweep.bench.main import main

main()
