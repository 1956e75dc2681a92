#!/usr/bin/env bash
# Set up the model share for a multi-machine cluster: one machine serves EXPORT_DIR over NFS, agents read it.
#
# usage:
#   setup_nfs.sh EXPORT_DIR [CLIENT_NETWORK]
#       Kernel NFS server (package nfs-kernel-server): creates EXPORT_DIR/models, adds or updates EXPORT_DIR's line
#       in /etc/exports (re-running never adds a second line), runs `exportfs -ra`, and prints the commands for the
#       agent machines (`mount -t nfs ...` and `cluster agent --share ...`).
#   setup_nfs.sh --userspace [--bind ADDR] [--state DIR] [--timeout S] EXPORT_DIR [CLIENT_NETWORK]
#       Userspace NFS server (nfs-ganesha + rpcbind) for machines whose kernel has no NFS server (containers, some
#       VMs). Starts the daemons in the background, waits until the export answers, and prints the nfs://ADDR/export
#       address that agents pass to `cluster agent --share`. Running it again while it serves does nothing.
#   setup_nfs.sh --stop [--state DIR]
#       Stops what --userspace started (by the pid files in the state dir) and removes rpcbind's files in /run.
#
# CLIENT_NETWORK: who may mount the share, as an IPv4 network (10.0.0.0/24) or a host. The default is the local
#   network the server is on: for the kernel server, the network of the interface with the default route (the usual
#   "all machines on this LAN" setup); with --userspace, the network of the --bind address (127.0.0.0/8 for the
#   default 127.0.0.1, which serves this machine only). Clients get read-write access with no_root_squash, because
#   agents and the publisher usually run as root; narrow CLIENT_NETWORK rather than widen it.
# --bind ADDR   address the userspace server listens on (default 127.0.0.1: this machine only).
# --state DIR   config, logs, pid files of the userspace server (default /var/lib/cluster-nfs).
# --timeout S   how long to wait for the userspace server to answer (default 30).
#
# Requirements: root (it edits /etc/exports or binds ports 111/2049/20048). Exit status 0 on success, 1 with a
# message on stderr otherwise.
set -euo pipefail

PROG=${0##*/}
MODE=kernel
BIND=127.0.0.1
STATE=/var/lib/cluster-nfs
TIMEOUT=30
NFS_PORT=2049
MNT_PORT=20048
PSEUDO=/export
MOUNT_POINT=/mnt/cluster-share
# Files rpcbind and ganesha leave behind (ganesha's VFS plugin makes libblkid write its cache); --stop removes those
# of them that did not exist before we started, files before the folders that hold them.
LEFTOVER_CANDIDATES=(/run/rpcbind.lock /run/rpcbind.sock /run/rpcbind/rpcbind.xdr /run/rpcbind/portmap.xdr
    /run/ganesha /run/blkid/blkid.tab /run/blkid/blkid.tab.old /run/blkid)

die() { echo "$PROG: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

# --- arguments ---------------------------------------------------------------------------------------------------
ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --userspace) MODE=userspace ;;
        --stop) MODE=stop ;;
        --bind | --state | --timeout)
            [ $# -ge 2 ] || die "$1 needs a value (see --help)"
            case $1 in --bind) BIND=$2 ;; --state) STATE=$2 ;; --timeout) TIMEOUT=$2 ;; esac
            shift ;;
        --bind=*) BIND=${1#*=} ;;
        --state=*) STATE=${1#*=} ;;
        --timeout=*) TIMEOUT=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        --) shift; ARGS+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done

[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds, got '$TIMEOUT'"
[[ $BIND =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "--bind takes an IPv4 address, got '$BIND'"
STATE=$(realpath -m -- "$STATE")
# The paths go into /etc/exports and ganesha's config, where spaces, quotes and braces would break the syntax.
[[ $STATE =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "state dir '$STATE' has characters other than letters, digits and ._/+-"

if [ "$MODE" = stop ]; then
    [ ${#ARGS[@]} -eq 0 ] || die "--stop takes no EXPORT_DIR (it stops what --state $STATE records)"
else
    [ ${#ARGS[@]} -ge 1 ] && [ ${#ARGS[@]} -le 2 ] || { usage >&2; exit 1; }
    EXPORT_DIR=$(realpath -m -- "${ARGS[0]}")
    [[ $EXPORT_DIR =~ ^/[A-Za-z0-9._/+-]*$ ]] ||
        die "export dir '$EXPORT_DIR' has characters other than letters, digits and ._/+-"
    [ "$EXPORT_DIR" != / ] || die "refusing to export /"
    NETWORK=${ARGS[1]:-}
    [ -z "$NETWORK" ] || [[ $NETWORK =~ ^[A-Za-z0-9.:*-]+(/[0-9]{1,2})?$ ]] ||
        die "CLIENT_NETWORK must look like 10.0.0.0/24 or a host name, got '$NETWORK'"
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (it edits /etc/exports or starts NFS daemons on ports below 1024)"

# --- helpers -----------------------------------------------------------------------------------------------------

# The connected IPv4 network (e.g. 10.0.0.0/24) of network device $1.
device_network() { ip -4 route show dev "$1" proto kernel scope link 2>/dev/null | awk 'NR == 1 { print $1 }'; }

default_device() { ip -4 route show default 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }'; }

# The network a server listening on address $1 serves by default.
network_of() {
    local dev
    case $1 in
        127.*) echo 127.0.0.0/8; return ;;
        0.0.0.0) dev=$(default_device) ;;
        *) dev=$(ip -o -4 addr show 2>/dev/null | awk -v a="$1" '{ split($4, x, "/"); if (x[1] == a) { print $2; exit } }') ;;
    esac
    [ -n "$dev" ] && device_network "$dev"
}

# This machine's address on the interface with the default route (what agent machines use to reach it).
primary_address() {
    local dev addr=""
    dev=$(default_device)
    [ -z "$dev" ] || addr=$(ip -o -4 addr show dev "$dev" 2>/dev/null | awk '{ split($4, x, "/"); print x[1]; exit }')
    [ -n "$addr" ] || addr=$(hostname -I 2>/dev/null | awk '{ print $1 }')
    echo "${addr:-SERVER}"
}

# Whether process $1 exists and is not a zombie (an exited daemon of ours waits to be reaped by PID 1 for a while).
pid_alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}

# Pid recorded in file $1 if that process is alive and runs program $2 (so a recycled pid is never signalled).
live_pid() {
    local pid exe
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [ "${exe##*/}" = "$2" ] && pid_alive "$pid" || return 1
    echo "$pid"
}

# Stop the process recorded in pid file $1 (program $2): SIGTERM, then SIGKILL after 15 s.
stop_pidfile() {
    local pid deadline
    if pid=$(live_pid "$1" "$2"); then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while live_pid "$1" "$2" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if live_pid "$1" "$2" >/dev/null; then
            say "$2 (pid $pid) ignored SIGTERM for 15 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while live_pid "$1" "$2" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        fi
        say "stopped $2 (pid $pid)"
    fi
    rm -f -- "$1"
}

rpcbind_answers() { timeout 5 rpcinfo >/dev/null 2>&1; }

port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

plugins_dir() {
    local arch d
    if arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null) && [ -e "/usr/lib/$arch/ganesha/libfsalvfs.so" ]; then
        echo "/usr/lib/$arch/ganesha"; return 0
    fi
    for d in /usr/lib/*/ganesha /usr/lib64/ganesha /usr/lib/ganesha; do
        [ -e "$d/libfsalvfs.so" ] && { echo "$d"; return 0; }
    done
    return 1
}

do_stop() {
    local path
    stop_pidfile "$STATE/ganesha.pid" ganesha.nfsd
    stop_pidfile "$STATE/rpcbind.pid" rpcbind
    if [ -f "$STATE/leftovers" ]; then
        while IFS= read -r path; do
            case $path in
                /run/ganesha | /run/blkid) rmdir -- "$path" 2>/dev/null || true ;;  # only if empty
                /run/rpcbind.lock | /run/rpcbind.sock | /run/rpcbind/*.xdr | /run/blkid/blkid.tab*) rm -f -- "$path" ;;
            esac
        done <"$STATE/leftovers"
        rm -f -- "$STATE/leftovers"
    fi
}

# --- kernel NFS server -------------------------------------------------------------------------------------------

kernel_has_nfsd() {
    # /proc/fs/nfsd can exist as an empty folder on kernels that cannot serve NFS: ask for the nfsd file system.
    grep -qw nfsd /proc/filesystems && return 0
    command -v modprobe >/dev/null && modprobe -q nfsd 2>/dev/null && grep -qw nfsd /proc/filesystems
}

setup_kernel() {
    command -v exportfs >/dev/null ||
        die "no NFS server installed: apt-get install nfs-kernel-server (or run $PROG --userspace for nfs-ganesha)"
    kernel_has_nfsd ||
        die "this kernel has no NFS server support (no nfsd file system); serve from userspace instead: $PROG --userspace $EXPORT_DIR"
    if [ -z "$NETWORK" ]; then
        NETWORK=$(network_of 0.0.0.0) || true
        [ -n "$NETWORK" ] || die "cannot work out this machine's network; pass CLIENT_NETWORK (e.g. 10.0.0.0/24)"
    fi
    mkdir -p -- "$EXPORT_DIR/models"

    local line tmp
    line="$EXPORT_DIR $NETWORK(rw,sync,no_subtree_check,no_root_squash)"
    touch /etc/exports
    tmp=$(mktemp /etc/exports.XXXXXX)
    { awk -v d="$EXPORT_DIR" '$1 != d' /etc/exports; echo "$line"; } >"$tmp"
    if cmp -s "$tmp" /etc/exports; then
        rm -f -- "$tmp"
    else
        chmod 644 "$tmp"
        mv -f -- "$tmp" /etc/exports
        say "/etc/exports: $line"
    fi
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl enable --now nfs-server >/dev/null || die "systemctl could not start nfs-server"
    elif [ -x /etc/init.d/nfs-kernel-server ]; then
        /etc/init.d/nfs-kernel-server start >/dev/null || die "/etc/init.d/nfs-kernel-server could not start the server"
    else
        say "no systemd and no /etc/init.d/nfs-kernel-server: make sure the NFS server (nfsd, mountd) runs"
    fi
    exportfs -ra

    local server
    server=$(primary_address)
    cat <<EOF
Share ready: $EXPORT_DIR exported to $NETWORK (kernel NFS server).
On each agent machine (apt-get install nfs-common):
    mkdir -p $MOUNT_POINT && mount -t nfs $server:$EXPORT_DIR $MOUNT_POINT
    cluster agent --share $MOUNT_POINT
EOF
}

# --- userspace NFS server (nfs-ganesha) ----------------------------------------------------------------------------

write_ganesha_config() {
    cat >"$STATE/ganesha.conf" <<EOF
# Written by $PROG. Serves $EXPORT_DIR as $PSEUDO to $NETWORK, NFSv3 and v4 over TCP.
NFS_CORE_PARAM {
    Bind_addr = $BIND;
    NFS_Port = $NFS_PORT;  MNT_Port = $MNT_PORT;
    Protocols = 3, 4;
    Enable_NLM = false;  Enable_RQUOTA = false;  Enable_UDP = false;
    mount_path_pseudo = true;          # NFSv3 uses the $PSEUDO path too: one URL for v3 and v4
    Plugins_Dir = $1;
}
NFS_KRB5 { Active_krb5 = false; }
NFSv4 {
    Graceless = true;                  # no 90 s grace period after a restart (v4 opens would fail meanwhile)
    Lease_Lifetime = 10;
    RecoveryBackend = fs;  RecoveryRoot = $STATE/recovery;   # emptied at each start
    Only_Numeric_Owners = true;        # no idmapd
}
EXPORT {
    Export_Id = 1;  Path = $EXPORT_DIR;  Pseudo = $PSEUDO;
    Access_Type = None;                # only CLIENT_NETWORK below gets in
    Squash = No_Root_Squash;  SecType = sys;
    Protocols = 3, 4;  Transports = TCP;
    CLIENT { Clients = $NETWORK; Access_Type = RW; }
    FSAL { Name = VFS; }
}
EOF
}

print_userspace() {
    local addr=$BIND
    [ "$addr" != 0.0.0.0 ] || addr=$(primary_address)
    cat <<EOF
Share ready: nfs://$addr$PSEUDO serves $EXPORT_DIR to $NETWORK (nfs-ganesha, pid $1, state in $STATE).
Agents read it over NFS from userspace (libnfs-utils):
    cluster agent --share nfs://$addr$PSEUDO
or, where the kernel can mount NFS:
    mkdir -p $MOUNT_POINT && mount -t nfs -o vers=3 $addr:$PSEUDO $MOUNT_POINT && cluster agent --share $MOUNT_POINT
Stop it with:
    $0 --stop --state $STATE
EOF
}

setup_userspace() {
    local tool plugins pid path deadline url
    for tool in ganesha.nfsd rpcbind rpcinfo nfs-ls; do
        command -v "$tool" >/dev/null ||
            die "$tool not found: apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils"
    done
    plugins=$(plugins_dir) || die "ganesha's VFS plugin (libfsalvfs.so) not found: apt-get install nfs-ganesha-vfs"
    if [ -z "$NETWORK" ]; then
        NETWORK=$(network_of "$BIND") || true
        [ -n "$NETWORK" ] || die "cannot work out the network of $BIND; pass CLIENT_NETWORK (e.g. 10.0.0.0/24)"
    fi
    mkdir -p -- "$STATE" "$EXPORT_DIR/models"

    if pid=$(live_pid "$STATE/ganesha.pid" ganesha.nfsd); then
        grep -qxF "    Export_Id = 1;  Path = $EXPORT_DIR;  Pseudo = $PSEUDO;" "$STATE/ganesha.conf" &&
            grep -qxF "    Bind_addr = $BIND;" "$STATE/ganesha.conf" ||
            die "the server recorded in $STATE (pid $pid) serves another folder or address; stop it first: $0 --stop --state $STATE"
        say "already running (pid $pid), nothing to do"
        print_userspace "$pid"
        return 0
    fi
    port_in_use "$BIND" "$NFS_PORT" &&
        die "$BIND:$NFS_PORT is in use by another NFS server (kernel nfsd or another ganesha); stop it or use --bind"

    rm -f -- "$STATE/leftovers"
    for path in "${LEFTOVER_CANDIDATES[@]}"; do
        [ -e "$path" ] || [ -L "$path" ] || echo "$path" >>"$STATE/leftovers"
    done
    trap 'do_stop >/dev/null 2>&1' EXIT  # a failed start leaves nothing running; disarmed on success

    if rpcbind_answers; then
        rm -f -- "$STATE/rpcbind.pid"  # someone else's rpcbind: use it, never stop it
    else
        # setsid: the daemons must outlive this script and its terminal (and not get its process group's signals)
        (cd / && exec setsid rpcbind -f </dev/null >>"$STATE/rpcbind.log" 2>&1) &
        echo $! >"$STATE/rpcbind.pid"
        deadline=$((SECONDS + TIMEOUT))
        until rpcbind_answers; do
            pid_alive "$(cat "$STATE/rpcbind.pid")" || die "rpcbind exited at once: $(tail -n 5 "$STATE/rpcbind.log")"
            [ $SECONDS -lt $deadline ] || die "rpcbind did not answer within $TIMEOUT s"
            sleep 0.1
        done
    fi

    rm -rf -- "$STATE/recovery"  # stale client records would bring back the grace period
    mkdir -p -- "$STATE/recovery"
    write_ganesha_config "$plugins"
    [ ! -f "$STATE/ganesha.log" ] || mv -f -- "$STATE/ganesha.log" "$STATE/ganesha.log.old"  # errors below: this run's
    (cd / && exec setsid ganesha.nfsd -F -f "$STATE/ganesha.conf" -L "$STATE/ganesha.log" \
        -p "$STATE/ganesha.daemon.pid" -N NIV_EVENT </dev/null >>"$STATE/ganesha.out" 2>&1) &
    echo $! >"$STATE/ganesha.pid"

    url="nfs://$BIND$PSEUDO?version=3"
    [ "$BIND" != 0.0.0.0 ] || url="nfs://127.0.0.1$PSEUDO?version=3"
    deadline=$((SECONDS + TIMEOUT))
    until timeout 5 nfs-ls "$url" >/dev/null 2>&1; do
        pid_alive "$(cat "$STATE/ganesha.pid")" ||
            die "ganesha.nfsd exited; last lines of $STATE/ganesha.log:
$(grep -v -e dbus -e krb5 -e gssd "$STATE/ganesha.log" 2>/dev/null | tail -n 8)"
        # a config error does not stop ganesha: it runs on without the export, so look for it in the log
        ! grep -q ':CONFIG :CRIT :' "$STATE/ganesha.log" 2>/dev/null ||
            die "ganesha.nfsd rejected $STATE/ganesha.conf:
$(grep ':CONFIG :CRIT :' "$STATE/ganesha.log" | tail -n 8)"
        [ $SECONDS -lt $deadline ] || die "ganesha.nfsd did not answer on $url within $TIMEOUT s; see $STATE/ganesha.log"
        sleep 0.1
    done
    trap - EXIT
    print_userspace "$(cat "$STATE/ganesha.pid")"
}

case $MODE in
    kernel) setup_kernel ;;
    userspace) setup_userspace ;;
    stop)
        if [ -f "$STATE/ganesha.pid" ] || [ -f "$STATE/rpcbind.pid" ] || [ -f "$STATE/leftovers" ]; then
            do_stop
        else
            say "nothing recorded in $STATE, nothing to stop"
        fi
        ;;
esac
