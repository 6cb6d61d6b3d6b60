# Shared by bench/compare.sh and bench/scale.sh (sourced, not run). Needs BIN and WORK.

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# Writes a Sekisho config with AWS's rate limits (100 publishes/s per connection, 500
# CONNECTs/s per account...) off: the benchmarks measure the broker, and Mosquitto has no
# such limits.
unthrottled_config() {
  cat > "$1" <<TOML
[limits]
publishes_per_connection = 0
bytes_per_connection = 0
connects_per_client_id = 0
connects_per_account = 0
subscriptions_per_account = 0
publishes_per_account = 0
replay_per_second = 0
shared_replay_per_second = 0
shadow_requests_per_thing = 0
TOML
}

# Starts Sekisho on 127.0.0.1 (MQTT 18883, API 19443, HTTPS 18443, S3 19444) with a fresh data directory;
# sets SK (data directory), SKPID and ACCOUNT, and writes $WORK/policy.json: the one
# thing-name policy every benchmark device gets.
start_sekisho() {
  SK=$WORK/sekisho
  unthrottled_config "$WORK/sekisho.toml"
  "$BIN/sekisho" serve --config "$WORK/sekisho.toml" --data-dir "$SK" --mqtt-port 18883 --api-port 19443 --https-port 18443 --s3-port 19444 --bind 127.0.0.1 > "$WORK/sekisho.log" 2>&1 &
  SKPID=$!
  wait_port 19443 || { echo "sekisho did not start:"; cat "$WORK/sekisho.log"; exit 1; }
  ACCOUNT=$(awk '/Default account/ {print $3}' "$WORK/sekisho.log")
  cat > "$WORK/policy.json" <<JSON
{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:us-east-1:$ACCOUNT:client/\${iot:Connection.Thing.ThingName}"},
 {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:us-east-1:$ACCOUNT:topic/bench/\${iot:Connection.Thing.ThingName}"},
 {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:us-east-1:$ACCOUNT:topicfilter/bench/*"},
 {"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:us-east-1:$ACCOUNT:topic/bench/*"}]}
JSON
}
