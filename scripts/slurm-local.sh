#!/usr/bin/env bash
# Single-node SLURM (slurmctld + slurmd, munge auth, optional slurmdbd+MariaDB
# for sacct) on localhost, for CI on Debian 12 as root without systemd.
# The cluster tests (make test-cluster) start it, run tests/cluster/, and stop it.
# submitit needs sacct: without accounting a cancelled job's result() hangs.
#
#   bash slurm-local.sh install   # apt-get install the packages (idempotent)
#   bash slurm-local.sh start     # write configs, start daemons, wait for node idle
#   bash slurm-local.sh stop      # stop the daemons this script started (by PID file)
#   bash slurm-local.sh env       # print the export line clients need
#
# Env knobs: SLURM_BASE (default /tmp/bnsweep-slurm), WITH_DBD=1|0 (default 1).
# Clients (sbatch/srun/squeue/sacct/submitit) need: export SLURM_CONF=$SLURM_BASE/etc/slurm.conf
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/bnsweep-slurm}
WITH_DBD=${WITH_DBD:-1}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
export SLURM_CONF=$BASE/etc/slurm.conf
MYSQL_PORT=${MYSQL_PORT:-3307}

log() { echo "[slurm-local] $*" >&2; }

do_install() {
  local pkgs="slurmctld slurmd slurm-client munge"
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  # shellcheck disable=SC2086
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    [ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ] || apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
  fi
}

write_configs() {
  mkdir -p "$BASE"/{etc,state/ctld,state/d,log,run}
  cat > "$BASE/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$WITH_DBD" = 1 ]; then
    cat >> "$BASE/etc/slurm.conf" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
EOF
    cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$BASE/etc/slurmdbd.conf"
  else
    echo "AccountingStorageType=accounting_storage/none" >> "$BASE/etc/slurm.conf"
  fi
}

# start CMD... in its own session, in the background; record its PID
spawn() {
  local name=$1; shift
  setsid "$@" > "$BASE/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$BASE/run/$name.spawn.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then log "timeout waiting for $what"; return 1; fi
    sleep 0.3
  done
}

start_munge() {
  [ -s /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  spawn munged runuser -u munge -- /usr/sbin/munged --foreground
  wait_for 15 munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
  local d=$BASE/mysql
  mkdir -p "$d" && chown mysql:mysql "$d"
  if [ ! -d "$d/data/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$d/data" --auth-root-authentication-method=normal \
      --skip-test-db > "$BASE/log/mariadb-install.log" 2>&1
  fi
  spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$d/data" \
    --socket="$d/mysqld.sock" --pid-file="$d/mysqld.pid" --port="$MYSQL_PORT" \
    --bind-address=127.0.0.1 --log-error="$d/mariadb.err" --innodb-buffer-pool-size=64M
  wait_for 30 mariadb mariadb --socket="$d/mysqld.sock" -uroot -e 'select 1'
  mariadb --socket="$d/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
}

do_start() {
  do_install
  write_configs
  start_munge
  if [ "$WITH_DBD" = 1 ]; then
    start_mariadb
    # slurmdbd finds slurmdbd.conf next to $SLURM_CONF
    spawn slurmdbd /usr/sbin/slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  spawn slurmctld /usr/sbin/slurmctld -D -i -f "$SLURM_CONF"
  wait_for 30 slurmctld scontrol ping
  spawn slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF"
  wait_for 60 "node idle" sh -c "sinfo -h -n $HOST -o %T | grep -qx idle"
  log "up. export SLURM_CONF=$SLURM_CONF"
}

do_stop() {
  local n pid
  for n in slurmd slurmctld slurmdbd mariadbd munged; do
    [ -f "$BASE/run/$n.spawn.pid" ] || continue
    pid=$(cat "$BASE/run/$n.spawn.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && { log "$n ($pid) still alive, SIGKILL"; kill -KILL "$pid"; }
    fi
    rm -f "$BASE/run/$n.spawn.pid"
    log "stopped $n ($pid)"
  done
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
