#!/usr/bin/env bash
# A single-machine Apache Druid on 127.0.0.1 for tests and local use: no Docker, no
# download of a Druid distribution, only Maven Central (which serves Druid 33.0.0 here).
#
#   druid.sh up      fetch the jars once, start ZooKeeper, coordinator (as overlord, with
#                    the Derby metadata server), broker, historical and indexer (tasks in
#                    process), wait until the broker answers SQL; later starts keep the
#                    data, the metadata and the ports
#   druid.sh down    stop the Druid processes, then ZooKeeper (last: stopped first, the
#                    Druid processes hang in their shutdown for over 30 s)
#   druid.sh reset   stop it and delete its data, metadata and ports: the next up is new
#   druid.sh status  print the broker URL and exit 0 when every process is running
#
# The state folder records the broker URL in `url` and the coordinator (overlord) URL in
# `coordinator` (kept while Druid is down).
#
# Environment:
#   DRIVERSCORE_DRUID_DIR      state folder (config, data, logs, pids)  default .driverscore/druid
#   DRIVERSCORE_DRUID_VERSION  org.apache.druid version                  default 33.0.0
#   DRIVERSCORE_DRUID_CACHE    jar cache root     default ${XDG_CACHE_HOME:-~/.cache}/driverscore
#   DRIVERSCORE_DRUID_HEAP     -Xmx of each Druid process                 default 512m
#   DRIVERSCORE_DRUID_TIMEOUT  seconds to wait until SQL answers          default 240
#   PYTHON                     interpreter for port and HTTP checks       default python3
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=${DRIVERSCORE_DRUID_VERSION:-33.0.0}
cache_root=${DRIVERSCORE_DRUID_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driverscore}
dist="$cache_root/druid-$version"
state=${DRIVERSCORE_DRUID_DIR:-.driverscore/druid}
heap=${DRIVERSCORE_DRUID_HEAP:-512m}
timeout=${DRIVERSCORE_DRUID_TIMEOUT:-240}
py=${PYTHON:-python3}
services=(coordinator broker historical indexer)

fetch_jars() {
  [ -f "$dist/.complete" ] && return 0
  command -v mvn >/dev/null || { echo "druid: mvn not found (needed once to fetch Druid)" >&2; exit 1; }
  # Download into a private folder and rename: two runs at once never see half a cache.
  local tmp="$dist.tmp.$$"
  mkdir -p "$tmp/lib" "$tmp/extensions/druid-kafka-indexing-service"
  echo "druid: fetching org.apache.druid:druid-services:$version from Maven Central (once)" >&2
  mvn -q -B -s "$here/settings.xml" -f "$here/pom.xml" -Ddruid.version="$version" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/lib" >&2
  mvn -q -B -s "$here/settings.xml" -f "$here/pom.xml" -Ddruid.version="$version" \
    -Pkafka-extension dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp/extensions/druid-kafka-indexing-service" >&2
  touch "$tmp/.complete"
  mv -T "$tmp" "$dist" 2>/dev/null || rm -rf "$tmp"
}

pid_of() {
  local file="$state/$1.pid" pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

free_port() {
  "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

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

http_ok() {
  "$py" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

sql_answers() {
  "$py" - "$1" <<'EOF'
import json, sys, urllib.request
request = urllib.request.Request(
    sys.argv[1] + "/druid/v2/sql", data=json.dumps({"query": "SELECT 1"}).encode(),
    headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=5) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

write_config() {
  local zk=$1 derby=$2 coordinator=$3 broker=$4 historical=$5 indexer=$6
  local abs
  abs=$(cd "$state" && pwd)
  mkdir -p "$state/conf/_common" "$state/var/tmp" "$state/log"
  for service in "${services[@]}"; do mkdir -p "$state/conf/$service"; done
  cat > "$state/conf/zoo.cfg" <<EOF
tickTime=2000
dataDir=$abs/var/zk
clientPort=$zk
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
EOF
  cat > "$state/conf/_common/common.runtime.properties" <<EOF
druid.extensions.directory=$dist/extensions
druid.extensions.loadList=["druid-kafka-indexing-service"]
druid.host=127.0.0.1
druid.bindOnHost=true
druid.zk.service.host=127.0.0.1:$zk
druid.zk.paths.base=/druid
druid.metadata.storage.type=derby
druid.metadata.storage.connector.connectURI=jdbc:derby://127.0.0.1:$derby/$abs/var/metadata.db;create=true
druid.metadata.storage.connector.host=127.0.0.1
druid.metadata.storage.connector.port=$derby
druid.storage.type=local
druid.storage.storageDirectory=$abs/var/segments
druid.indexer.logs.type=file
druid.indexer.logs.directory=$abs/var/indexing-logs
druid.selectors.indexing.serviceName=druid/overlord
druid.selectors.coordinator.serviceName=druid/coordinator
druid.monitoring.monitors=[]
druid.emitter=noop
druid.startup.logging.logProperties=false
druid.sql.enable=true
druid.lookup.enableLookupSyncOnStartup=false
druid.processing.buffer.sizeBytes=33554432
druid.processing.numMergeBuffers=2
druid.processing.numThreads=1
druid.processing.tmpDir=$abs/var/tmp
# Latest-record-per-trip queries group by trip: with 32 MiB merge buffers they spill.
druid.query.groupBy.maxOnDiskStorage=4294967296
druid.server.http.numThreads=6
EOF
  cat > "$state/conf/_common/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8" ?>
<Configuration status="WARN">
  <Appenders>
    <Console name="Console" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} %p [%t] %c{1} - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="Console"/></Root>
    <Logger name="org.apache.druid.cli" level="info" additivity="false"><AppenderRef ref="Console"/></Logger>
  </Loggers>
</Configuration>
EOF
  cat > "$state/conf/coordinator/runtime.properties" <<EOF
druid.service=druid/coordinator
druid.plaintextPort=$coordinator
druid.coordinator.startDelay=PT5S
druid.coordinator.period=PT5S
druid.manager.segments.pollDuration=PT5S
druid.coordinator.asOverlord.enabled=true
druid.coordinator.asOverlord.overlordService=druid/overlord
druid.indexer.queue.startDelay=PT1S
druid.indexer.runner.type=remote
druid.indexer.storage.type=metadata
EOF
  cat > "$state/conf/broker/runtime.properties" <<EOF
druid.service=druid/broker
druid.plaintextPort=$broker
druid.broker.http.numConnections=5
druid.broker.cache.useCache=false
druid.broker.cache.populateCache=false
EOF
  cat > "$state/conf/historical/runtime.properties" <<EOF
druid.service=druid/historical
druid.plaintextPort=$historical
druid.segmentCache.locations=[{"path":"$abs/var/segment-cache","maxSize":"4g"}]
EOF
  cat > "$state/conf/indexer/runtime.properties" <<EOF
druid.service=druid/indexer
druid.plaintextPort=$indexer
druid.worker.capacity=6
druid.indexer.task.baseTaskDir=$abs/var/task
druid.indexer.task.restoreTasksOnRestart=true
EOF
}

java_flags=(
  -server "-Xms64m" "-Xmx$heap" -XX:MaxDirectMemorySize=256m -XX:+ExitOnOutOfMemoryError
  -XX:+UseSerialGC -XX:TieredStopAtLevel=1
  -Duser.timezone=UTC -Dfile.encoding=UTF-8
  -Djava.util.logging.manager=org.apache.logging.log4j.jul.LogManager
  # Java 17: the flags of Druid's documentation (memory-mapped segments, direct buffers).
  --add-exports=java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports=java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED
)

start_process() {
  local name=$1; shift
  nohup java "$@" >> "$state/log/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}

up() {
  if [ -f "$state/url" ] && status >/dev/null; then
    cat "$state/url"
    return 0
  fi
  fetch_jars
  mkdir -p "$state"
  local ports port
  if [ -f "$state/ports" ]; then
    # A restart: the same ports, so the recorded URLs and the metadata stay valid.
    read -r -a ports < "$state/ports"
    for port in "${ports[@]}"; do
      if ! port_free "$port"; then
        echo "druid: port 127.0.0.1:$port of the Druid in $state is taken by another process:" \
          "stop that process (\`driverscore druid down\` if it is this Druid's old JVM), or run" \
          "\`driverscore druid reset\` to delete this Druid's data and start on new ports" >&2
        exit 1
      fi
    done
  else
    ports=()
    while [ "${#ports[@]}" -lt 6 ]; do
      port=$(free_port)
      [[ " ${ports[*]} " == *" $port "* ]] || ports+=("$port")
    done
    echo "${ports[*]}" > "$state/ports"
  fi
  local zk=${ports[0]} derby=${ports[1]} coordinator=${ports[2]} broker=${ports[3]}
  local historical=${ports[4]} indexer=${ports[5]}
  write_config "$zk" "$derby" "$coordinator" "$broker" "$historical" "$indexer"
  local abs classpath
  abs=$(cd "$state" && pwd)
  classpath="$dist/lib/*"
  pid_of zookeeper >/dev/null || start_process zookeeper -Xmx128m -Dzookeeper.admin.enableServer=false \
    -Djava.io.tmpdir="$abs/var/tmp" -cp "$classpath" \
    org.apache.zookeeper.server.ZooKeeperServerMain "$abs/conf/zoo.cfg"
  local service
  for service in "${services[@]}"; do
    pid_of "$service" >/dev/null && continue
    # The Derby server (in the coordinator) writes derby.log to the working folder otherwise.
    start_process "$service" "${java_flags[@]}" -Djava.io.tmpdir="$abs/var/tmp" \
      -Dderby.stream.error.file="$abs/log/derby.log" \
      -cp "$abs/conf/_common:$abs/conf/$service:$classpath" \
      org.apache.druid.cli.Main server "$service"
  done
  echo "http://127.0.0.1:$broker" > "$state/url"
  echo "http://127.0.0.1:$coordinator" > "$state/coordinator"
  local deadline=$((SECONDS + timeout))
  until sql_answers "http://127.0.0.1:$broker" && http_ok "http://127.0.0.1:$indexer/status/health" \
      && http_ok "http://127.0.0.1:$historical/druid/historical/v1/readiness"; do
    for service in zookeeper "${services[@]}"; do
      if ! pid_of "$service" >/dev/null; then
        echo "druid: $service exited during start-up; last lines of $state/log/$service.log:" >&2
        tail -n 20 "$state/log/$service.log" >&2 || true
        stop_all
        exit 1
      fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "druid: SQL not answering after ${timeout}s (logs in $state/log)" >&2
      stop_all
      exit 1
    fi
    sleep 1
  done
  cat "$state/url"
}

stop_one() {
  local name=$1 pid
  pid=$(pid_of "$name") || { rm -f "$state/$name.pid"; return 0; }
  kill "$pid" 2>/dev/null || true
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.5
    waited=$((waited + 1))
    if [ "$waited" -ge 60 ]; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -f "$state/$name.pid"
}

stop_all() {
  # Druid's processes first, in parallel, ZooKeeper last (see the top of this file).
  local service
  for service in indexer historical broker coordinator; do stop_one "$service" & done
  wait
  stop_one zookeeper
}

status() {
  local service
  for service in zookeeper "${services[@]}"; do
    pid_of "$service" >/dev/null || return 1
  done
  cat "$state/url"
}

case "${1:-}" in
  up) up ;;
  down) stop_all ;;
  reset)
    stop_all
    rm -rf "$state/var" "$state/ports" "$state/url" "$state/coordinator" "$state/conf" "$state/log"
    ;;
  status) status ;;
  *) echo "usage: druid.sh up|down|reset|status" >&2; exit 2 ;;
esac
