#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for the tests and for trying launch/slurm/ by hand.
#
#   launch/slurm/local_cluster.sh up       install (Debian packages, only if missing) and start; idempotent
#   launch/slurm/local_cluster.sh down     stop the daemons this script started (by their pid files)
#   launch/slurm/local_cluster.sh status   sinfo
#   eval "$(launch/slurm/local_cluster.sh env)"   point sbatch/sinfo/scontrol at this cluster (SLURM_CONF)
#
# Two slurmd daemons serve two node names (`slurmd -N NAME`, each with its own port, spool and log) on this
# host, so `sbatch --nodes=2` gets a real two-node allocation. The config lives in its own folder
# ($MOETRAIN_SLURM_DIR, default /var/tmp/moetrain-slurm) and is used through SLURM_CONF: a machine's own
# /etc/slurm is never touched.
#
# Accounting (slurmdbd on a private MariaDB instance in the same folder) makes `sacct` work, which the
# submitit launcher polls to notice a job that died without a result. If it cannot start, the cluster runs
# without it (a warning says so); set MOETRAIN_SLURM_ACCOUNTING=none to skip it.
set -euo pipefail

DIR=${MOETRAIN_SLURM_DIR:-/var/tmp/moetrain-slurm}
CONF=$DIR/slurm.conf
NODES=(${MOETRAIN_SLURM_NODES:-node1 node2})
CTLD_PORT=${MOETRAIN_SLURM_PORT:-6817}  # slurmd ports follow: CTLD_PORT+1, CTLD_PORT+2, ...
CPUS=${MOETRAIN_SLURM_CPUS:-$(nproc)}   # per node name; both names share this host's cores
ACCOUNTING=${MOETRAIN_SLURM_ACCOUNTING:-slurmdbd}  # slurmdbd | none
DBD_PORT=$((CTLD_PORT + 10))
DB_PORT=$((CTLD_PORT + 11))
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }

install_packages() {
  local missing=() packages=(slurmctld slurmd slurm-client munge)
  [ "$ACCOUNTING" = none ] || packages+=(slurmdbd mariadb-server)
  for pkg in "${packages[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  ((${#missing[@]} == 0)) && return 0
  if [ "$(id -u)" -ne 0 ]; then log "missing ${missing[*]} and not root: cannot apt-get install"; return 1; fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

sql() { mariadb --socket="$DIR/db/mysqld.sock" -u root "$@"; }

# slurmdbd keeps its records in a private MariaDB instance (own datadir, socket and loopback port).
start_accounting() {
  if ! pid_alive "$DIR/db/mariadbd.pid"; then
    if [ ! -d "$DIR/db/data/mysql" ]; then
      log "initialising the accounting database in $DIR/db"
      install -d -o mysql -g mysql "$DIR/db" "$DIR/db/data"
      mariadb-install-db --user=mysql --datadir="$DIR/db/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    fi
    log "starting mariadbd (127.0.0.1:$DB_PORT)"
    setsid mariadbd --user=mysql --datadir="$DIR/db/data" --socket="$DIR/db/mysqld.sock" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --pid-file="$DIR/db/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 sql -e "select 1" >/dev/null 2>&1 || { log "mariadbd did not start: $DIR/log/mariadbd.log"; return 1; }
  fi
  sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  if ! pid_alive "$DIR/slurmdbd.pid"; then
    log "starting slurmdbd (port $DBD_PORT)"
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  fi
  wait_for 30 sacctmgr -n list cluster >/dev/null 2>&1 || { log "slurmdbd did not answer: $DIR/log/slurmdbd.log"; return 1; }
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  log "starting munged"
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "munged did not answer"; return 1
}

accounting_lines() {
  if [ "$ACCOUNTING" = none ]; then
    echo "AccountingStorageType=accounting_storage/none"
  else
    printf '%s\n' "AccountingStorageType=accounting_storage/slurmdbd" "AccountingStorageHost=localhost" \
      "AccountingStoragePort=$DBD_PORT"
  fi
}

write_dbd_conf() {  # slurmdbd refuses a config that others can read
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$tmp"
  mv "$tmp" "$DIR/slurmdbd.conf"
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  local host tmp port i
  host=$(hostname -s)
  tmp=$(mktemp)
  cat >"$tmp" <<CONF
# Written by launch/slurm/local_cluster.sh: two node names on one host ($host).
ClusterName=moetrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# no cgroups in containers: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$(accounting_lines)
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node lines below, not the probed hardware, say what each name offers
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
CONF
  i=1
  for node in "${NODES[@]}"; do
    port=$((CTLD_PORT + i))
    echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS State=UNKNOWN" >>"$tmp"
    i=$((i + 1))
  done
  local nodelist
  nodelist=$(IFS=,; echo "${NODES[*]}")
  echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" >>"$tmp"
  mv "$tmp" "$CONF"
  chmod 644 "$CONF"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

all_idle() {
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -c . <<<"$states")" -eq "${#NODES[@]}" ] && ! grep -qvE ' (idle|mixed|allocated)$' <<<"$states"
}

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do ((SECONDS < deadline)) || return 1; sleep 0.5; done
}

up() {
  install_packages || { [ "$ACCOUNTING" = none ] || { ACCOUNTING=none; install_packages; }; }
  start_munge
  mkdir -p "$DIR/log"
  local before
  before=$(cat "$CONF" 2>/dev/null || true)
  write_conf
  if [ "$ACCOUNTING" != none ]; then
    write_dbd_conf
    if ! start_accounting; then
      log "WARNING: no accounting (sacct will not work); continuing without it"
      ACCOUNTING=none
      write_conf
    fi
  fi
  [ "$before" = "$(cat "$CONF")" ] || stop_daemons  # a new config needs fresh daemons
  if ! pid_alive "$DIR/slurmctld.pid"; then
    log "starting slurmctld ($CONF)"
    slurmctld -f "$CONF" -c  # -c: start with no jobs left from an earlier life
  fi
  wait_for 30 scontrol ping >/dev/null || { log "slurmctld did not answer; see $DIR/log/slurmctld.log"; return 1; }
  for node in "${NODES[@]}"; do
    if ! pid_alive "$DIR/slurmd-$node.pid"; then
      log "starting slurmd -N $node"
      slurmd -f "$CONF" -N "$node"
    fi
  done
  if ! wait_for 30 all_idle; then
    # a node left DOWN/DRAIN by an earlier unclean stop comes back with RESUME
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    wait_for 30 all_idle || { sinfo -N >&2; log "nodes not idle; see $DIR/log/"; return 1; }
  fi
  sinfo -N
  log "up: export SLURM_CONF=$CONF"
}

stop_daemons() {  # stop_daemons [all]: all = also slurmdbd and its database
  local pidfile pidfiles=("$DIR"/slurmd-*.pid "$DIR/slurmctld.pid")
  [ "${1:-}" = all ] && pidfiles+=("$DIR/slurmdbd.pid" "$DIR/db/mariadbd.pid")
  local pid
  for pidfile in "${pidfiles[@]}"; do
    if pid_alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      wait_for 30 bash -c "! kill -0 $pid 2>/dev/null" || log "pid $pid ($pidfile) still running"
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  up) up ;;
  down) stop_daemons all; log "down" ;;
  status) sinfo -N ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
