#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, with accounting (slurmdbd + MariaDB), for trying and
# testing workflow/profiles/slurm. Run as root on a Debian/Ubuntu machine without systemd:
#
#   workflow/scripts/slurm-cluster.sh start    # installs packages if missing; waits until the node is idle
#   workflow/scripts/slurm-cluster.sh stop     # stops only what `start` started; restores /etc/slurm/slurm.conf
#   workflow/scripts/slurm-cluster.sh status
#
# Everything lives in SEGREPRO_SLURM_DIR (default /tmp/segrepro-slurm): configuration, MariaDB's
# datadir, state, spool, logs and the pids of the daemons this script started. Both commands can be
# run twice. Exit status: 0 ok, 1 error, 3 the packages could not be installed (nothing started).
# SLURM's own slurm.conf must be /etc/slurm/slurm.conf: the executor plugin's job step strips SLURM_*
# variables (SLURM_CONF too) before its inner srun, which then finds no configuration.
set -euo pipefail

DIR=${SEGREPRO_SLURM_DIR:-/tmp/segrepro-slurm}
DB_PORT=${SEGREPRO_SLURM_DB_PORT:-33306}
WAIT_SECONDS=${SEGREPRO_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs it backwards

die() { echo "slurm-cluster: $*" >&2; exit 1; }
say() { echo "slurm-cluster: $*"; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { cat "$DIR/pids/$1" 2>/dev/null || true; }

# Bounded wait for a condition (a command); prints nothing, returns 1 after $2 seconds.
wait_for() {
  local what=$1 seconds=$2 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

log_tail() { tail -n 15 "$DIR/log/$1".* 2>/dev/null | sed 's/^/    /' >&2 || true; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && command -v slurmdbd >/dev/null \
    && command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null && return 0
  command -v apt-get >/dev/null || { echo "slurm-cluster: SLURM is not installed and there is no apt-get" >&2; exit 3; }
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet: update once, only when the install fails.
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/slurm-cluster-apt.log" 2>&1; then
    apt-get update -q >>"${TMPDIR:-/tmp}/slurm-cluster-apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"${TMPDIR:-/tmp}/slurm-cluster-apt.log" 2>&1 || {
      echo "slurm-cluster: apt-get install ${PACKAGES[*]} failed (see ${TMPDIR:-/tmp}/slurm-cluster-apt.log)" >&2
      exit 3
    }
  fi
  for missing in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$missing" >/dev/null || { echo "slurm-cluster: '$missing' still missing after apt-get install" >&2; exit 3; }
  done
}

# Start a daemon in the foreground of a new session (detached from the caller's terminal and
# pipes) and record its pid; `setsid` without a fork keeps $! the daemon's own pid.
launch() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name"
}

node_idle() { [[ $(sinfo -h -n localhost -o %T 2>/dev/null) == idle ]]; }
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then
    say "munged already runs (left alone)"
    return
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  launch munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
  wait_for munge 10 munge_works || { log_tail munged; die "munged did not start"; }
}

start_mariadb() {
  local data=$DIR/mysql sock=$DIR/mysql/mysqld.sock
  install -d -o mysql -g mysql -m 0750 "$data"
  mariadb-install-db --no-defaults --user=mysql --datadir="$data" --skip-test-db \
    >"$DIR/log/mariadb-install.out" 2>&1 || { log_tail mariadb-install; die "mariadb-install-db failed"; }
  launch mariadbd mariadbd --no-defaults --user=mysql --datadir="$data" --socket="$sock" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$data/mariadbd.pid" \
    --log-error="$DIR/log/mariadbd.log"
  wait_for mariadb 30 mariadb --no-defaults --socket="$sock" -uroot -e "SELECT 1" \
    || { log_tail mariadbd; die "MariaDB did not start on 127.0.0.1:$DB_PORT"; }
  mariadb --no-defaults --socket="$sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

write_configs() {
  # The node as slurmd sees it; RealMemory at 90% of what it reports leaves room for the OS.
  local node cpus sockets cores threads memory
  node=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$node")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$node")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$node")
  memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  [[ -n $cpus && -n $memory ]] || die "cannot read the node's CPUs and memory from 'slurmd -C': $node"
  cat >"$DIR/etc/slurm.conf" <<CONF
# Written by workflow/scripts/slurm-cluster.sh; its 'stop' puts back what was here before.
ClusterName=segrepro
SlurmctldHost=localhost(127.0.0.1)
# Every daemon binds the address its host name resolves to (127.0.0.1 here), not every interface:
# a test cluster is reachable from this machine only.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=300
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$((memory * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$DIR/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
CommunicationParameters=NoInAddrAny
SlurmUser=slurm
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm "$DIR/etc/slurmdbd.conf"
  chmod 0600 "$DIR/etc/slurmdbd.conf"
}

install_conf() {
  mkdir -p /etc/slurm
  if [[ -e $CONF && ! -e $DIR/slurm.conf.orig && ! -e $DIR/slurm.conf.none ]]; then
    cp -p "$CONF" "$DIR/slurm.conf.orig"
  elif [[ ! -e $CONF ]]; then
    touch "$DIR/slurm.conf.none"
  fi
  cp "$DIR/etc/slurm.conf" "$CONF"
  chmod 0644 "$CONF"
}

restore_conf() {
  if [[ -e $DIR/slurm.conf.orig ]]; then
    cp -p "$DIR/slurm.conf.orig" "$CONF"
  elif [[ -e $DIR/slurm.conf.none ]]; then
    rm -f "$CONF"
  fi
}

running() {
  local name
  for name in slurmctld slurmd slurmdbd; do
    alive "$(pid_of "$name")" || return 1
  done
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (it starts munged, MariaDB and the SLURM daemons)"
  install_packages
  if [[ -d $DIR/pids ]] && running; then
    wait_for node "$WAIT_SECONDS" node_idle || die "the cluster in $DIR runs but node 'localhost' is not idle: $(sinfo -h -N -o '%N %T %E' 2>&1)"
    say "already running ($DIR)"
    return
  fi
  [[ -d $DIR/pids ]] && stop  # left over from a crash: clean up first
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "a SLURM daemon not started by this script already runs on this machine (pgrep slurmctld/slurmd)"
  fi
  # On any failure from here on, take down what was started (die exits, which runs the trap).
  trap 'if (($? != 0)); then echo "slurm-cluster: start failed; stopping what it started" >&2; stop >&2; fi' EXIT
  mkdir -p "$DIR"
  chmod 0755 "$DIR"
  install -d -m 0755 "$DIR/etc" "$DIR/pids"
  install -d -o slurm -g slurm -m 0755 "$DIR/state" "$DIR/log" "$DIR/run"
  install -d -m 0755 "$DIR/spool"
  local began=$SECONDS
  start_munge
  start_mariadb
  write_configs
  install_conf
  launch slurmdbd env SLURM_CONF="$DIR/etc/slurm.conf" slurmdbd -D
  wait_for slurmdbd 30 sacctmgr -n list cluster || { log_tail slurmdbd; die "slurmdbd did not answer (sacctmgr list cluster)"; }
  launch slurmctld slurmctld -D -c -i
  wait_for slurmctld 30 scontrol ping || { log_tail slurmctld; die "slurmctld did not answer (scontrol ping)"; }
  launch slurmd slurmd -D -N localhost
  if ! wait_for node "$WAIT_SECONDS" node_idle; then
    log_tail slurmd
    die "node 'localhost' not idle after ${WAIT_SECONDS}s: $(sinfo -h -N -o '%N %T %E' 2>&1)"
  fi
  trap - EXIT
  say "running: node localhost idle after $((SECONDS - began))s; partition debug; account root; state in $DIR"
}

stop() {
  if [[ ! -d $DIR/pids ]]; then
    restore_conf 2>/dev/null || true
    say "not running (no $DIR/pids)"
    return
  fi
  local i name pid jobs
  # Cancel this cluster's jobs first, so that no job step outlives slurmd.
  if alive "$(pid_of slurmctld)"; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      scancel $jobs 2>/dev/null || true
      wait_for jobs 20 bash -c '[[ -z $(squeue -h -t R,CG -o %i) ]]' || true
    fi
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    pid=$(pid_of "$name")
    if alive "$pid"; then
      kill -TERM "$pid"
      wait_for "$name" 20 bash -c "! kill -0 $pid" || { kill -KILL "$pid" 2>/dev/null || true; }
    fi
    rm -f "$DIR/pids/$name"
  done
  restore_conf
  rm -rf "$DIR"
  say "stopped"
}

status() {
  if [[ -d $DIR/pids ]] && running; then
    sinfo -N -o '%N %P %T %c %m'
  else
    say "not running"
    return 1
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
