"""Concurrent commands on one fresh store share one MLflow server (two terminals, a new user's ``mlruns/``).

Two real processes start at the same moment: ``bnsweep ui`` and a sweep's or report's ``connect``. Before
the store's start lock both started a server over the new SQLite store, whose migrations collided
(``error: mlflow server exited with code 1``), or two servers ran over one database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

CONNECT = ("import sys; from omegaconf import OmegaConf; from bnsweep.tracking.server import connect\n"
           "print('uri', connect(OmegaConf.create({'uri': None, 'store_dir': sys.argv[1], 'port': None})))")


def servers_over(cwd: Path) -> list[psutil.Process]:
    """The ``mlflow server`` parent processes started from ``cwd`` (their web workers not counted)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if p.info["cwd"] == str(cwd) and "mlflow" in cmd and "server" in cmd and "--workers" in cmd:
            found.append(p)
    return found


def test_two_commands_on_a_fresh_store_share_one_server(tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    cmds = [[sys.executable, "-m", "bnsweep", "ui", "--store-dir", str(store)],
            [sys.executable, "-c", CONNECT, str(store)]]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        running = servers_over(tmp_path)
    finally:
        for p in procs:
            p.kill()
        subprocess.run([sys.executable, "-m", "bnsweep", "down", "--store-dir", str(store)], cwd=tmp_path,
                       capture_output=True, timeout=120)
        for p in servers_over(tmp_path):  # a second server (the race lost) has no pid file to be stopped by
            p.kill()
    shown = "\n".join(o + e for o, e in outs)
    assert [p.returncode for p in procs] == [0, 0], shown
    ui = [line.split()[2] for line in outs[0][0].splitlines() if line.startswith("MLflow dashboard:")]
    other = [line.split()[1] for line in outs[1][0].splitlines() if line.startswith("uri ")]
    assert len(ui) == 1 and ui == other, shown  # both talk to the same server
    assert len(running) == 1, [p.info["cmdline"] for p in running]  # and only one runs over the store
