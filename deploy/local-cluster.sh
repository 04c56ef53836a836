#!/usr/bin/env bash
# Runs an N-node chatnode cluster on 127.0.0.1 for development.
#
#   deploy/local-cluster.sh start N [--base-port P] [--dir DIR]
#   deploy/local-cluster.sh status [--dir DIR]
#   deploy/local-cluster.sh stop   [--dir DIR]
#
# Node i (0..N-1) is node id i, named node-<i>, with
#   HTTP/WebSocket 127.0.0.1:P+i, client QUIC P+100+i, peer QUIC P+200+i, gossip P+300+i,
# data in DIR/node-<i>, log in DIR/node-<i>.log, pid in DIR/node-<i>.pid. Every node seeds
# from node 0's gossip address. The cluster CA, secret and node certificates are made once in
# DIR/cluster and reused on later starts.
#
# The binary is $CHATNODE, else target/release/chatnode, else target/debug/chatnode (relative
# to the repository this script is in). Defaults: P=9000, DIR=./local-cluster.
#
# `stop` sends SIGTERM only to the pids this script recorded (and only if that pid is still
# the chatnode serving that node's data dir), then waits for them to exit.

set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname -- "$SCRIPT_DIR")"
readonly SCRIPT_DIR REPO_DIR
readonly READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-30}"
readonly STOP_TIMEOUT_SECS="${STOP_TIMEOUT_SECS:-45}"  # room for the drain (30 s by default)

BASE_PORT=9000
DIR="$PWD/local-cluster"

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

find_chatnode() {
    if [[ -n "${CHATNODE:-}" ]]; then
        [[ -x "$CHATNODE" ]] || die "\$CHATNODE=$CHATNODE is not an executable file"
        echo "$CHATNODE"
    elif [[ -x "$REPO_DIR/target/release/chatnode" ]]; then
        echo "$REPO_DIR/target/release/chatnode"
    elif [[ -x "$REPO_DIR/target/debug/chatnode" ]]; then
        echo "$REPO_DIR/target/debug/chatnode"
    else
        die "no chatnode binary: build it (cargo build --release -p chatnode) or set \$CHATNODE"
    fi
}

# Parses --base-port and --dir out of the arguments; anything else is an error.
parse_options() {
    while (($# > 0)); do
        case "$1" in
            --base-port)
                [[ $# -ge 2 ]] || die "--base-port needs a value"
                BASE_PORT="$2"
                shift 2
                ;;
            --base-port=*)
                BASE_PORT="${1#*=}"
                shift
                ;;
            --dir)
                [[ $# -ge 2 ]] || die "--dir needs a value"
                DIR="$2"
                shift 2
                ;;
            --dir=*)
                DIR="${1#*=}"
                shift
                ;;
            -h | --help) usage 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
    done
    [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || die "--base-port must be a number, not '$BASE_PORT'"
    ((BASE_PORT >= 1024 && BASE_PORT + 399 <= 65535)) ||
        die "--base-port must leave room for 400 ports between 1024 and 65535"
    mkdir -p -- "$DIR"
    DIR="$(cd -- "$DIR" && pwd)"
}

pid_file() { echo "$DIR/node-$1.pid"; }

# The recorded pid of node $1 if that process is alive and is a chatnode; empty otherwise.
running_pid() {
    local file pid
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 0
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    if [[ -r "/proc/$pid/cmdline" ]] &&
        ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--data-dir $DIR/node-$1 "; then
        return 0 # the pid was reused by something else
    fi
    echo "$pid"
}

# Node indexes with a pid file, ascending.
recorded_nodes() {
    local file name
    for file in "$DIR"/node-*.pid; do
        [[ -e "$file" ]] || continue
        name="${file##*/node-}"
        echo "${name%.pid}"
    done | sort -n
}

# Succeeds when GET http://127.0.0.1:$1$2 answers 200.
http_ok() {
    local port="$1" path="$2"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port$path" 2>/dev/null
        return
    fi
    local status
    exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
    IFS= read -r -t 2 status <&3 || status=""
    exec 3>&-
    [[ "$status" == *" 200"* ]]
}

make_certs() {
    local n="$1" chatnode="$2" cluster="$DIR/cluster" i
    if [[ ! -f "$cluster/ca.pem" ]]; then
        "$chatnode" certs init --cluster-dir "$cluster" >/dev/null ||
            die "chatnode certs init failed"
    fi
    for ((i = 0; i < n; i++)); do
        if [[ ! -f "$cluster/node-$i.pem" || ! -f "$cluster/node-$i.key" ]]; then
            "$chatnode" certs node --cluster-dir "$cluster" --name "node-$i" \
                --host 127.0.0.1 --host localhost >/dev/null ||
                die "chatnode certs node failed for node-$i"
        fi
    done
}

start_node() {
    local i="$1" chatnode="$2" p="$BASE_PORT" pid
    pid="$(running_pid "$i")"
    if [[ -n "$pid" ]]; then
        echo "node-$i already running (pid $pid)"
        return
    fi
    mkdir -p -- "$DIR/node-$i"
    nohup "$chatnode" serve \
        --data-dir "$DIR/node-$i" \
        --node-id "$i" \
        --http-addr "127.0.0.1:$((p + i))" \
        --quic-addr "127.0.0.1:$((p + 100 + i))" \
        --peer-addr "127.0.0.1:$((p + 200 + i))" \
        --gossip-addr "127.0.0.1:$((p + 300 + i))" \
        --seed "127.0.0.1:$((p + 300))" \
        --cluster-dir "$DIR/cluster" \
        >>"$DIR/node-$i.log" 2>&1 </dev/null &
    echo "$!" >"$(pid_file "$i")"
}

wait_ready() {
    local i="$1" port=$((BASE_PORT + $1)) deadline=$((SECONDS + READY_TIMEOUT_SECS))
    while ! http_ok "$port" /readyz; do
        if [[ -z "$(running_pid "$i")" ]]; then
            echo "node-$i exited before it was ready; the end of $DIR/node-$i.log:" >&2
            tail -n 20 "$DIR/node-$i.log" >&2 || true
            rm -f -- "$(pid_file "$i")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "node-$i not ready after ${READY_TIMEOUT_SECS}s; see $DIR/node-$i.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

print_table() {
    local i pid state p="$BASE_PORT"
    printf '%-8s %-4s %-8s %-9s %-26s %-30s %-21s %-21s %s\n' \
        NODE ID PID STATE HTTP WEBSOCKET QUIC PEER GOSSIP
    for i in "$@"; do
        pid="$(running_pid "$i")"
        if [[ -z "$pid" ]]; then
            state=stopped
            pid=-
        elif http_ok "$((p + i))" /readyz; then
            state=ready
        else
            state=starting
        fi
        printf '%-8s %-4s %-8s %-9s %-26s %-30s %-21s %-21s %s\n' \
            "node-$i" "$i" "$pid" "$state" \
            "http://127.0.0.1:$((p + i))" "ws://127.0.0.1:$((p + i))/v1/ws" \
            "127.0.0.1:$((p + 100 + i))" "127.0.0.1:$((p + 200 + i))" \
            "127.0.0.1:$((p + 300 + i))"
    done
    echo "logs: $DIR/node-<i>.log   cluster dir: $DIR/cluster"
}

cmd_start() {
    local n="${1:-}"
    if ! [[ "$n" =~ ^[0-9]+$ ]] || ((n < 1 || n > 100)); then
        die "start needs a node count from 1 to 100"
    fi
    shift
    parse_options "$@"
    echo "$BASE_PORT" >"$DIR/base-port"
    local chatnode i failed=0
    chatnode="$(find_chatnode)"
    make_certs "$n" "$chatnode"
    for ((i = 0; i < n; i++)); do
        start_node "$i" "$chatnode"
    done
    for ((i = 0; i < n; i++)); do
        wait_ready "$i" || failed=1
    done
    # shellcheck disable=SC2046 # one index per word
    print_table $(seq 0 $((n - 1)))
    ((failed == 0)) || die "some nodes did not start; '$0 stop --dir $DIR' stops the others"
}

load_base_port() {
    if [[ -f "$DIR/base-port" ]]; then
        BASE_PORT="$(<"$DIR/base-port")"
    fi
}

cmd_status() {
    parse_options "$@"
    load_base_port
    local nodes
    nodes="$(recorded_nodes)"
    [[ -n "$nodes" ]] || {
        echo "no nodes recorded in $DIR"
        return
    }
    # shellcheck disable=SC2086 # one index per word
    print_table $nodes
}

cmd_stop() {
    parse_options "$@"
    local i pid deadline stopped=()
    for i in $(recorded_nodes); do
        pid="$(running_pid "$i")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            stopped+=("$i:$pid")
        fi
    done
    deadline=$((SECONDS + STOP_TIMEOUT_SECS))
    for entry in "${stopped[@]}"; do
        i="${entry%%:*}"
        pid="${entry#*:}"
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "node-$i (pid $pid) still running after ${STOP_TIMEOUT_SECS}s; left alone" >&2
        else
            echo "stopped node-$i (pid $pid)"
            rm -f -- "$(pid_file "$i")"
        fi
    done
    for i in $(recorded_nodes); do
        [[ -n "$(running_pid "$i")" ]] || rm -f -- "$(pid_file "$i")"
    done
}

main() {
    (($# > 0)) || usage
    local cmd="$1"
    shift
    case "$cmd" in
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage 0 ;;
        *) die "unknown command: $cmd (start, stop or status)" ;;
    esac
}

main "$@"
