#!/bin/sh
# Starts the Redis server given as arguments with one ACL user per role of the service,
# each with its own password from the environment: REDIS_PASSWORD_API, _WORKER,
# _COORDINATOR, _FLOWER (each from that role's Secret; a role without one gets no user,
# so the cache Redis knows no Flower). The default user is off: every connection
# authenticates. The ACL file is written to memory (an emptyDir), never to argv.
# Used by deploy/k8s/base/redis.yaml, redis-payload.yaml and docker-compose.yml alike;
# tests/test_k8s.py starts real servers with it and checks every role's rights.
#
#   api, worker, coordinator: every key and channel, every command but the dangerous
#     ones (CONFIG, FLUSHALL, KEYS, DEBUG, SHUTDOWN, ACL, MONITOR, ...). With
#     REDIS_KEYS set (the payload servers: `ofa:v1:payload:*`), only keys matching that
#     pattern and no channel at all: a payload server holds image bytes and nothing
#     else, so a leaked payload password reads no job, verdict or API key.
#   flower: Celery's monitoring and remote control only: its commands may touch only
#     kombu's bindings, its unacknowledged-message index and restore lock, Flower's own
#     reply and event queues (read and write), the task queues' lengths (read-only)
#     and Celery's event and control channels; not jobs, blobs, API key records, rate
#     limits, the `done` channel or a task queue's contents. It cannot be read-only:
#     Celery's `inspect` (Flower's worker pages) sends its request on the same
#     broadcast channel as `shutdown`, and collects the replies on a queue it
#     declares and deletes.
#     kombu also tries to restore overdue unacknowledged messages whenever it reads
#     a reply: Flower may not write to task queues, so that transaction is refused
#     whole (nothing changes; the workers restore them on their next sweep) and an
#     `inspect` made meanwhile fails for those few seconds.
#   probe: PING only, no password (the readiness check; it reaches nothing else).
#   replication: a replica's login on the primary (masteruser, redis-ha.sh): the
#     replication handshake only (REDIS_PASSWORD_REPLICATION; durable Redis with HA).
#   sentinel: the Sentinels' login (their auth-user, redis-ha.sh): what they send to
#     watch the servers and promote one: INFO, ROLE, their hello channel, REPLICAOF
#     and CONFIG REWRITE in a transaction, CLIENT KILL (REDIS_PASSWORD_SENTINEL).
set -eu

acl="${REDIS_ACL_FILE:-/run/redis/users.acl}"

# The role's password, checked: it goes into an ACL line and into URLs, so letters,
# digits, - and _ only (`openssl rand -hex 32`).
password_of() {
    password="$(printenv "REDIS_PASSWORD_$(echo "$1" | tr a-z A-Z)" || true)"
    case "$password" in
    *[!A-Za-z0-9_-]*)
        echo "redis-start.sh: the $1 password may hold only letters, digits, - and _" >&2
        exit 1
        ;;
    esac
}

# The service roles' keys and channels: everything, or one key pattern and no channel.
keys="${REDIS_KEYS:-}"
case "$keys" in
*[!A-Za-z0-9:_*-]*)
    echo "redis-start.sh: REDIS_KEYS may hold only letters, digits, :, _, - and *" >&2
    exit 1
    ;;
"") reach="~* &*" ;;
*) reach="resetkeys resetchannels ~$keys" ;;
esac

umask 077
{
    echo "user default off resetpass resetkeys resetchannels -@all"
    echo "user probe on nopass resetkeys resetchannels -@all +ping"
    for role in api worker coordinator; do
        password_of "$role"
        if [ -n "$password" ]; then
            # +info: INFO is among the "dangerous" commands, but reads nothing of the
            # data; the API exports the memory use and cap from it (the memory alert).
            echo "user $role on >$password $reach +@all -@dangerous +info"
        fi
    done
    # Task queues are named ofa.<kind>.<model>@<revision> (Celery's, read-only here);
    # the service's own keys start with OFA_KEY_PREFIX (ofa:v1:), which no pattern
    # below matches.
    password_of flower
    if [ -n "$password" ]; then
        echo "user flower on >$password resetkeys resetchannels" \
            "+@all -@dangerous -script|flush -function" \
            "%R~ofa.* %R~celery* ~unacked* ~_kombu.binding* ~celeryev.* ~*.reply.celery.pidbox*" \
            "&/0.celeryev/* &/0.celery.pidbox"
    fi
    password_of replication
    if [ -n "$password" ]; then
        echo "user replication on >$password resetkeys resetchannels -@all" \
            "+psync +sync +replconf +ping"
    fi
    password_of sentinel
    if [ -n "$password" ]; then
        echo "user sentinel on >$password resetkeys &* -@all +multi +exec +ping +info" \
            "+role +subscribe +publish +slaveof +replicaof +config|rewrite" \
            "+client|setname +client|kill +script|kill"
    fi
} >"$acl"
exec "$@" --aclfile "$acl"
