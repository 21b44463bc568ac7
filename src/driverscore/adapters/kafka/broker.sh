#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, combined broker + controller) on 127.0.0.1 for tests
# and local use: no Docker, no download of a Kafka distribution, only Maven Central.
#
#   broker.sh up      fetch the jars once, format storage on the first start, start, wait
#                     until it answers; later starts keep the data, cluster id and ports
#   broker.sh down    stop the broker started from the same state folder (data kept)
#   broker.sh reset   stop it and delete its data, cluster id and ports: the next up is new
#   broker.sh status  print the bootstrap address and exit 0 when it is running
#
# The state folder records the address in `bootstrap` (kept while the broker is down:
# `driverscore` commands in the same home connect to it without any setting).
#
# Environment:
#   DRIVERSCORE_KAFKA_DIR      state folder (config, data, log, pid)   default .driverscore/kafka
#   DRIVERSCORE_KAFKA_VERSION  org.apache.kafka:kafka_2.13 version      default 4.1.1
#   DRIVERSCORE_KAFKA_CACHE    jar cache root     default ${XDG_CACHE_HOME:-~/.cache}/driverscore
#   DRIVERSCORE_KAFKA_HEAP     broker -Xmx                              default 512m
#   DRIVERSCORE_KAFKA_TIMEOUT  seconds to wait for readiness            default 90
#   PYTHON                     interpreter with confluent-kafka          default python3
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=${DRIVERSCORE_KAFKA_VERSION:-4.1.1}
cache_root=${DRIVERSCORE_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driverscore}
libs="$cache_root/kafka-$version/libs"
state=${DRIVERSCORE_KAFKA_DIR:-.driverscore/kafka}
heap=${DRIVERSCORE_KAFKA_HEAP:-512m}
timeout=${DRIVERSCORE_KAFKA_TIMEOUT:-90}
py=${PYTHON:-python3}

running_pid() {
  [ -f "$state/broker.pid" ] || return 1
  local pid
  pid=$(cat "$state/broker.pid")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

fetch_jars() {
  [ -f "$libs/kafka_2.13-$version.jar" ] && return 0
  command -v mvn >/dev/null || { echo "kafka: mvn not found (needed once to fetch Kafka)" >&2; exit 1; }
  # Download into a private folder and rename: two runs at once never see half a cache.
  local tmp="$libs.tmp.$$"
  mkdir -p "$tmp"
  echo "kafka: fetching org.apache.kafka:kafka_2.13:$version from Maven Central" >&2
  mvn -q -B -f "$here/pom.xml" -Dkafka.version="$version" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" >&2
  mv -T "$tmp" "$libs" 2>/dev/null || rm -rf "$tmp"
}

free_port() {
  "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# SO_REUSEADDR like the broker's own listener: a port whose last connections are still in
# TIME_WAIT after a stop counts as free; only a socket bound to it now counts as taken.
port_free() {
  "$py" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
' "$1"
}

wait_ready() {
  local pid=$1 bootstrap=$2
  "$py" - "$pid" "$bootstrap" "$timeout" <<'EOF'
import os, sys, time
from confluent_kafka.admin import AdminClient
from confluent_kafka import KafkaException

pid, bootstrap, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("kafka: broker exited during start-up")
    try:
        # Metadata with a controller and a live broker: the broker accepts requests.
        meta = admin.list_topics(timeout=2)
        if meta.brokers:
            sys.exit(0)
    except KafkaException:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"kafka: broker not ready after {timeout:.0f}s")
    time.sleep(0.5)
EOF
}

up() {
  if pid=$(running_pid); then
    cat "$state/bootstrap"
    return 0
  fi
  fetch_jars
  mkdir -p "$state"
  local broker_port controller_port port
  if [ -f "$state/ports" ]; then
    # A restart: the same address, so clients and the recorded bootstrap stay valid.
    read -r broker_port controller_port < "$state/ports"
    for port in "$broker_port" "$controller_port"; do
      if ! port_free "$port"; then
        echo "kafka: port 127.0.0.1:$port of the broker in $state is taken by another process:" \
          "stop that process, or run \`driverscore kafka reset\` to delete this broker's data" \
          "and start it on new ports" >&2
        exit 1
      fi
    done
  else
    broker_port=$(free_port)
    controller_port=$(free_port)
    while [ "$controller_port" = "$broker_port" ]; do controller_port=$(free_port); done
    echo "$broker_port $controller_port" > "$state/ports"
  fi
  cat > "$state/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$broker_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$broker_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$(cd "$state" && pwd)/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# The default 128 MB dedupe buffer would take a quarter of the small heap.
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.threads=1
num.network.threads=2
num.io.threads=2
EOF
  # Format once: meta.properties is written last, so without it the folder holds nothing
  # of value (a first start that failed half-way).
  if [ ! -f "$state/data/meta.properties" ]; then
    rm -rf "$state/data"
    local cluster_id
    # -I: no script folder on sys.path (its modules must not shadow the standard library).
    cluster_id=$("$py" -I "$here/cluster_id.py")
    echo "$cluster_id" > "$state/cluster.id"
    java -cp "$libs/*" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$state/server.properties" > "$state/format.log" 2>&1 \
      || { cat "$state/format.log" >&2; exit 1; }
  fi
  # setsid: the broker outlives this script and a Ctrl-C in the calling terminal.
  setsid java -Xms128m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$libs/*" kafka.Kafka "$state/server.properties" > "$state/broker.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$state/broker.pid"
  echo "127.0.0.1:$broker_port" > "$state/bootstrap"
  if ! wait_ready "$pid" "127.0.0.1:$broker_port"; then
    tail -n 30 "$state/broker.log" >&2 || true
    kill "$pid" 2>/dev/null || true
    exit 1
  fi
  cat "$state/bootstrap"
}

down() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$state/broker.pid"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$state/broker.pid"; return 0; }
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$state/broker.pid"
}

reset() {
  down
  # Only the files this script writes: the folder itself may hold other things.
  rm -rf "$state/data"
  rm -f "$state/ports" "$state/bootstrap" "$state/cluster.id" "$state/server.properties" \
    "$state/format.log" "$state/broker.log"
}

status() {
  if running_pid >/dev/null; then
    cat "$state/bootstrap"
  else
    echo "kafka: not running (state folder $state)" >&2
    return 1
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  reset) reset ;;
  status) status ;;
  *) echo "usage: $(basename "$0") up|down|reset|status" >&2; exit 2 ;;
esac
