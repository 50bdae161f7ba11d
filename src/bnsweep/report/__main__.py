"""``python -m bnsweep.report``, as before: the same as ``bnsweep report``."""

from bnsweep.report.build import main

main()
