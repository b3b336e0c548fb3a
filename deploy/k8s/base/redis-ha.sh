#!/bin/sh
# The durable Redis with Sentinel: starts this pod's server or its Sentinel.
#
#   redis-ha.sh server   redis-server ARGS...   a primary or a replica, then redis-start.sh
#   redis-ha.sh sentinel redis-server ARGS...   a Sentinel watching them
#   redis-ha.sh handover                        before a server stops on purpose (preStop):
#                                               if it is the primary, a replica takes over
#
# Both ask the Sentinels (REDIS_SENTINELS, "host:port ...") which server is the primary
# now; with no answer (the first start, or every Sentinel down) the primary is
# REDIS_INITIAL_PRIMARY (host:port). So a server that restarts after a failover comes
# back as a replica of the promoted one instead of a second primary. Addresses are the
# per-pod Services' names (stable virtual IPs: a rescheduled pod gets a new pod IP,
# which Sentinel would not notice, having resolved the name once).
#
# Environment (the StatefulSet's; docker-compose.yml's `sentinel` profile alike):
#   REDIS_MASTER_NAME      the name the Sentinels monitor the primary under (ofa-durable)
#   REDIS_ANNOUNCE         this server as the others reach it (host:port)
#   SENTINEL_ANNOUNCE      this Sentinel as the others reach it (host:port)
#   REDIS_SENTINELS, REDIS_INITIAL_PRIMARY: above
#   SENTINEL_QUORUM, SENTINEL_DOWN_AFTER_MS, SENTINEL_FAILOVER_TIMEOUT_MS
#   REDIS_PASSWORD_REPLICATION  a replica's login on the primary (user `replication`)
#   REDIS_PASSWORD_SENTINEL     the Sentinels' login on the servers and on each other
#                               (user `sentinel`); both users are made by redis-start.sh
#   REDIS_HA_DIR           where the generated configuration goes (memory; it holds
#                          passwords, so never argv): /run/redis
# Without REDIS_SENTINELS (compose without the profile) a server just starts as the
# primary. tests/test_k8s.py starts three servers and three Sentinels with this script.
set -eu

mode="$1"
shift
here="$(dirname "$0")"
dir="${REDIS_HA_DIR:-/run/redis}"
master="${REDIS_MASTER_NAME:-ofa-durable}"

# A password from the environment into $value, checked as redis-start.sh checks the
# roles' ones: it goes into configuration lines.
secret() {
    value="$(printenv "$1" || true)"
    case "$value" in
    *[!A-Za-z0-9_-]*)
        echo "redis-ha.sh: $1 may hold only letters, digits, - and _" >&2
        exit 1
        ;;
    esac
}

# "host port" of the primary as the Sentinels know it now (REDIS_INITIAL_PRIMARY if none
# answers). A Sentinel on a lost node gets 3 s, not a TCP timeout of minutes. `-e`: an
# error reply is no answer.
current_primary() {
    # No Sentinels' password, no Sentinels (they refuse to start without it): compose
    # without its profile starts at once instead of waiting on names that do not exist.
    sentinels="${REDIS_SENTINELS:-}"
    [ -n "$(printenv REDIS_PASSWORD_SENTINEL || true)" ] || sentinels=""
    for sentinel in $sentinels; do
        [ "$sentinel" = "${SENTINEL_ANNOUNCE:-}" ] && continue # this pod's own: just started
        reply="$(timeout 3 redis-cli -e --raw -h "${sentinel%:*}" -p "${sentinel##*:}" \
            SENTINEL get-master-addr-by-name "$master" 2>/dev/null || true)"
        # shellcheck disable=SC2086 # two words: host, port
        set -- $reply
        if [ $# -eq 2 ]; then
            echo "$1 $2"
            return
        fi
    done
    echo "${REDIS_INITIAL_PRIMARY%:*} ${REDIS_INITIAL_PRIMARY##*:}"
}

umask 077
mkdir -p "$dir"
primary="$(current_primary)"

if [ "$mode" = handover ]; then
    # A rolling update or a node drain: the Sentinels promote a replica now (a second
    # or two) instead of noticing the primary gone 5 s later. Nothing to do for a
    # replica; with no replica in sync (or no Sentinel) the server just stops.
    me="${REDIS_ANNOUNCE:?redis-ha.sh: set REDIS_ANNOUNCE (host:port)}"
    [ "$primary" = "${me%:*} ${me##*:}" ] || exit 0
    secret REDIS_PASSWORD_SENTINEL
    for sentinel in ${REDIS_SENTINELS:-}; do
        # The password in the environment (REDISCLI_AUTH), not in argv.
        if REDISCLI_AUTH="$value" timeout 3 redis-cli -e --user sentinel \
            -h "${sentinel%:*}" -p "${sentinel##*:}" \
            SENTINEL FAILOVER "$master" >/dev/null 2>&1; then
            i=0
            while [ $i -lt 20 ] && [ "$(current_primary)" = "${me%:*} ${me##*:}" ]; do
                sleep 1
                i=$((i + 1))
            done
            exit 0
        fi
    done
    exit 0
fi

bin="$1"
shift

case "$mode" in
server)
    me="${REDIS_ANNOUNCE:?redis-ha.sh: set REDIS_ANNOUNCE (host:port)}"
    secret REDIS_PASSWORD_REPLICATION
    replication="$value"
    conf="$dir/server.conf"
    {
        # What the primary lists this replica as (INFO), hence what Sentinels promote.
        echo "replica-announce-ip ${me%:*}"
        echo "replica-announce-port ${me##*:}"
        if [ -n "$replication" ]; then
            echo "masteruser replication"
            echo "masterauth $replication"
        fi
        if [ "$primary" != "${me%:*} ${me##*:}" ]; then
            [ -n "$replication" ] || {
                echo "redis-ha.sh: a replica needs REDIS_PASSWORD_REPLICATION" >&2
                exit 1
            }
            echo "replicaof $primary"
        fi
    } >"$conf"
    # The configuration file goes first (redis-server's rule); redis-start.sh adds the
    # ACL users, replication's and the Sentinels' among them.
    exec sh "$here/redis-start.sh" "$bin" "$conf" "$@"
    ;;
sentinel)
    me="${SENTINEL_ANNOUNCE:?redis-ha.sh: set SENTINEL_ANNOUNCE (host:port)}"
    secret REDIS_PASSWORD_SENTINEL
    password="$value"
    [ -n "$password" ] || {
        echo "redis-ha.sh: a Sentinel needs REDIS_PASSWORD_SENTINEL" >&2
        exit 1
    }
    conf="$dir/sentinel.conf"
    {
        echo "port ${me##*:}"
        echo "dir $dir"
        # The ACL below guards it, the network policies limit who connects.
        echo "protected-mode no"
        echo "sentinel resolve-hostnames yes"
        echo "sentinel announce-hostnames yes"
        echo "sentinel announce-ip ${me%:*}"
        echo "sentinel announce-port ${me##*:}"
        # The same id whenever this pod starts again: its peers see the same Sentinel
        # come back, not a fourth one that would raise the majority a failover needs.
        echo "sentinel myid $(printf '%s' "$me" | sha1sum | cut -c1-40)"
        # Clients ask, without a password, where the primary is (the service's
        # Sentinel URLs carry credentials for the primary only); nothing else: no
        # SENTINEL SET, FAILOVER, RESET, CONFIG. Peers log in as `sentinel`.
        echo "user default on nopass resetkeys resetchannels -@all +ping +hello" \
            "+sentinel|get-master-addr-by-name +sentinel|masters +sentinel|master" \
            "+sentinel|replicas +sentinel|slaves +sentinel|sentinels"
        echo "user sentinel on >$password ~* &* +@all"
        echo "sentinel sentinel-user sentinel"
        echo "sentinel sentinel-pass $password"
        # shellcheck disable=SC2086 # "host port"
        echo "sentinel monitor $master $primary ${SENTINEL_QUORUM:-2}"
        echo "sentinel auth-user $master sentinel"
        echo "sentinel auth-pass $master $password"
        echo "sentinel down-after-milliseconds $master ${SENTINEL_DOWN_AFTER_MS:-5000}"
        echo "sentinel failover-timeout $master ${SENTINEL_FAILOVER_TIMEOUT_MS:-30000}"
        echo "sentinel parallel-syncs $master 1"
    } >"$conf"
    exec "$bin" "$conf" --sentinel "$@"
    ;;
*)
    echo "redis-ha.sh: server or sentinel, not $mode" >&2
    exit 2
    ;;
esac
