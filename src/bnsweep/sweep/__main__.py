"""``python -m bnsweep.sweep``, as before: the same as ``bnsweep sweep``."""

from bnsweep.sweep.launch_local import start_preloading

start_preloading()  # the workers' imports (~7 s) now overlap the driver's own

from bnsweep.sweep.driver import main  # noqa: E402

main()
