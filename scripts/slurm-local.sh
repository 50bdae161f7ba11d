#!/usr/bin/env bash
# SLURM on one machine (slurmctld + one slurmd per node, munge auth, optional slurmdbd+MariaDB
# for sacct), for CI on Debian 12 as root without systemd.
# The cluster tests (make test-cluster) start it with NODES=3, run tests/cluster/, and stop it.
# submitit needs sacct: without accounting a cancelled job's result() hangs.
#
#   bash slurm-local.sh install          # apt-get install the packages (idempotent)
#   bash slurm-local.sh start            # write configs, start daemons, wait for the nodes idle
#   bash slurm-local.sh stop             # stop the daemons this script started (by PID file)
#   bash slurm-local.sh kill-node NODE   # a node dies: SIGKILL its slurmd and every process of its jobs
#   bash slurm-local.sh start-node NODE  # the node boots again (its slurmd; SLURM returns it to service)
#   bash slurm-local.sh nodes            # the node names
#   bash slurm-local.sh env              # print the export line clients need
#
# Env knobs: SLURM_BASE (default /tmp/bnsweep-slurm), WITH_DBD=1|0 (default 1), NODES (default 1).
# NODES=1: one node named after this host, as before. NODES=N>1: nodes n1..nN, each its own slurmd
# (`slurmd -N nN` with its own NodeHostName, address 127.0.0.x, port, spool dir and log: Debian's
# slurmd needs no multiple-slurmd build for that), all sharing this machine's CPUs and memory.
# kill-node finds a node's processes by their environment (BNSWEEP_SLURM_NODE on its slurmd and
# slurmstepds, SLURMD_NODENAME in its jobs) and their descendants, and takes them down as a dead
# machine would: no signal handler runs, nothing is told.
# Preemption: jobs of partition `high` (PriorityTier=2) requeue those of `debug` (the default) they need
# room from (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=$GRACE_S s of SIGTERM first).
# Clients (sbatch/srun/squeue/sacct/submitit) need: export SLURM_CONF=$SLURM_BASE/etc/slurm.conf
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/bnsweep-slurm}
WITH_DBD=${WITH_DBD:-1}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
export SLURM_CONF=$BASE/etc/slurm.conf
MYSQL_PORT=${MYSQL_PORT:-3307}
NODES=${NODES:-1}
GRACE_S=${GRACE_S:-30}
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "error: NODES=$NODES: a number of nodes from 1 to 99 is allowed" >&2; exit 2; }

log() { echo "[slurm-local] $*" >&2; }

node_names() {  # the nodes (from slurm.conf once written, so kill-node needs no NODES)
  if [ -f "$SLURM_CONF" ]; then sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$SLURM_CONF"
  elif [ "$NODES" = 1 ]; then echo "$HOST"
  else seq -f "n%g" 1 "$NODES"; fi
}

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
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
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
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
EOF
  local i=0 n
  if [ "$NODES" = 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN" >> "$BASE/etc/slurm.conf"
  else
    for n in $(seq -f "n%g" 1 "$NODES"); do
      i=$((i + 1))
      echo "NodeName=$n NodeHostName=$n NodeAddr=127.0.0.$((i + 1)) Port=$((6830 + i)) CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN" \
        >> "$BASE/etc/slurm.conf"
    done
  fi
  cat >> "$BASE/etc/slurm.conf" <<EOF
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP LLN=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=high Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
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

start_slurmd() {  # the node's slurmd; BNSWEEP_SLURM_NODE marks it and its slurmstepds for kill-node
  local n=$1
  node_names | grep -qx "$n" || { echo "error: node $n: not a node of this cluster ($(node_names | tr '\n' ' '))" >&2; exit 2; }
  mkdir -p "$BASE/state/d/$n"
  if [ "$n" = "$HOST" ]; then  # NODES=1: the node is this host, as a real one-node cluster
    spawn "slurmd-$n" env BNSWEEP_SLURM_NODE="$n" /usr/sbin/slurmd -D -f "$SLURM_CONF"
  else
    spawn "slurmd-$n" env BNSWEEP_SLURM_NODE="$n" /usr/sbin/slurmd -D -N "$n" -f "$SLURM_CONF"
  fi
}

do_start() {
  do_install
  rm -f "$SLURM_CONF"
  write_configs
  start_munge
  if [ "$WITH_DBD" = 1 ]; then
    start_mariadb
    # slurmdbd finds slurmdbd.conf next to $SLURM_CONF
    spawn slurmdbd /usr/sbin/slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  spawn slurmctld /usr/sbin/slurmctld -D -c -i -f "$SLURM_CONF"  # -c: a fresh cluster, no jobs of an earlier one
  wait_for 30 slurmctld scontrol ping
  local n
  for n in $(node_names); do start_slurmd "$n"; done
  for n in $(node_names); do wait_for 60 "node $n idle" sh -c "sinfo -h -n $n -o %T | grep -qx idle"; done
  log "up: node(s) $(node_names | tr '\n' ' ')- export SLURM_CONF=$SLURM_CONF"
}

node_pids() {  # every process of node $1: its slurmd, slurmstepds, their jobs' processes, and all their descendants
  local n=$1 p
  {
    [ -f "$BASE/run/slurmd-$n.spawn.pid" ] && cat "$BASE/run/slurmd-$n.spawn.pid"
    # one grep over every environment (NUL-separated entries): fast, so the listing is close to a snapshot
    grep -lsxz -e "BNSWEEP_SLURM_NODE=$n" -e "SLURMD_NODENAME=$n" /proc/[0-9]*/environ | cut -d/ -f3 || true
  } | sort -u > "$BASE/run/kill-$n.roots"
  ps -e -o pid=,ppid= | awk -v roots="$(tr '\n' ' ' < "$BASE/run/kill-$n.roots")" '
    { kids[$2] = kids[$2] " " $1 }
    END { todo = roots
          while (todo != "") { m = split(todo, a, " "); todo = ""
            for (i = 1; i <= m; i++) { if (seen[a[i]]++) continue; print a[i]; todo = todo kids[a[i]] } } }'
  rm -f "$BASE/run/kill-$n.roots"
}

kill_node() {
  local n=$1 pids round
  node_names | grep -qx "$n" || { echo "error: node $n: not a node of this cluster ($(node_names | tr '\n' ' '))" >&2; exit 2; }
  for round in 1 2 3; do  # freeze first, so that nothing forks between the listing and the kill
    pids=$(node_pids "$n" | grep -vx -e "$$" -e "$BASHPID" || true)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -STOP $pids 2>/dev/null || true
  done
  pids=$(node_pids "$n" | grep -vx -e "$$" -e "$BASHPID" || true)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  rm -f "$BASE/run/slurmd-$n.spawn.pid"
  log "node $n killed: $(echo "$pids" | wc -w) process(es) SIGKILLed"
}

do_stop() {
  local n pid
  for n in $(cd "$BASE/run" 2>/dev/null && ls slurmd-*.spawn.pid 2>/dev/null | sed 's/\.spawn\.pid$//') \
      slurmctld slurmdbd mariadbd munged; do
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
  kill-node) kill_node "${2:?usage: $0 kill-node NODE}" ;;
  start-node) start_slurmd "${2:?usage: $0 start-node NODE}" ;;
  nodes) node_names ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 install|start|stop|kill-node NODE|start-node NODE|nodes|env" >&2; exit 2 ;;
esac
