//! The host with a real runtime: a `provided` function whose `bootstrap` is a shell script
//! speaking the Lambda Runtime API with curl, as AWS's custom-runtime tutorial does.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sekisho_functions::{Config, FunctionSpec, Host, HostError, Outcome};

const BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  hdr=$(mktemp); ev=$(mktemp)
  curl -sS -D "$hdr" -o "$ev" "$api/invocation/next"
  id=$(grep -i '^lambda-runtime-aws-request-id:' "$hdr" | tr -d '\r' | cut -d' ' -f2)
  event=$(cat "$ev")
  echo "handling $event"
  case "$event" in
    *sleep*) sleep 5 ;;
    *nap*) sleep 1 ;;
    *crash*) exit 3 ;;
    *fail*) curl -sS -X POST "$api/invocation/$id/error" -d '{"errorType":"Oops","errorMessage":"it failed"}' >/dev/null; continue ;;
    *probe*)
      second=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$api/invocation/next")
      init=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$api/init/error" -d '{}')
      curl -sS -X POST "$api/invocation/$id/response" -d "{\"second_next\":$second,\"late_init_error\":$init}" >/dev/null
      continue ;;
  esac
  curl -sS -X POST "$api/invocation/$id/response" -d "{\"pid\":$$,\"event\":$event,\"fn\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"key\":\"${AWS_ACCESS_KEY_ID:-}\",\"mine\":\"${MY_VAR:-}\"}" >/dev/null
done
"#;

fn zip_of(files: &[(&str, &str, u32)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, data, mode) in files {
            let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            z.start_file(*name, opts).unwrap();
            z.write_all(data.as_bytes()).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn host(per_function: usize) -> Arc<Host> {
    let dir = std::env::temp_dir().join(format!("sekisho-fn-{}", uuid::Uuid::new_v4().simple()));
    Host::new(Config {
        dir,
        python: "python3".into(),
        node_ric: "aws-lambda-ric".into(),
        max_instances: 8,
        max_per_function: per_function,
        max_per_account: 6,
        accounts: None,
        env: BTreeMap::new(),
        authorizer_min_seconds: 300,
    })
}

fn spec(h: &Host, timeout: Duration) -> FunctionSpec {
    let (sha, _) = h
        .store_code("123456789012", &zip_of(&[("bootstrap", BOOTSTRAP, 0o755)]))
        .unwrap();
    FunctionSpec {
        account: "123456789012".into(),
        name: "echo".into(),
        arn: "arn:aws:lambda:us-east-1:123456789012:function:echo".into(),
        runtime: "provided.al2023".into(),
        handler: "unused".into(),
        timeout,
        memory_mb: 128,
        env: BTreeMap::from([("MY_VAR".to_string(), "mine".to_string())]),
        code_sha: sha,
        region: "us-east-1".into(),
        credentials: Some(sekisho_functions::Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
        }),
        revision: "1".into(),
    }
}

fn response(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::Response(b) => serde_json::from_slice(b).unwrap(),
        Outcome::Error(b) => panic!("function error: {}", String::from_utf8_lossy(b)),
    }
}

fn error(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::Error(b) => serde_json::from_slice(b).unwrap(),
        Outcome::Response(b) => panic!("no error: {}", String::from_utf8_lossy(b)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_reuse_warm_instances_and_survive_errors_crashes_and_timeouts() {
    let h = host(2);
    let s = spec(&h, Duration::from_secs(2));
    let (_, first) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    let first = response(&first);
    assert_eq!(first["event"], serde_json::json!({"n": 1}));
    assert_eq!(
        (
            first["fn"].as_str(),
            first["key"].as_str(),
            first["mine"].as_str()
        ),
        (Some("echo"), Some("ASIAEXAMPLE"), Some("mine"))
    );
    let (_, second) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":2}"))
        .await
        .unwrap();
    assert_eq!(
        response(&second)["pid"],
        first["pid"],
        "the warm instance answered"
    );

    // A function error is the function's answer; the instance stays.
    let (_, failed) = h
        .invoke(&s, Bytes::from_static(b"{\"fail\":1}"))
        .await
        .unwrap();
    assert_eq!(error(&failed)["errorType"], "Oops");
    let (_, third) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":3}"))
        .await
        .unwrap();
    assert_eq!(response(&third)["pid"], first["pid"]);

    // A crash ends that invocation only; the next one gets a new instance.
    let (id, crashed) = h
        .invoke(&s, Bytes::from_static(b"{\"crash\":1}"))
        .await
        .unwrap();
    let e = error(&crashed);
    assert_eq!(e["errorType"], "Runtime.ExitError");
    assert!(e["errorMessage"].as_str().unwrap().contains(&id));
    let (_, after) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":4}"))
        .await
        .unwrap();
    assert_ne!(response(&after)["pid"], first["pid"]);

    // A timeout kills the instance and says so, as Lambda does.
    let (id, slow) = h
        .invoke(&s, Bytes::from_static(b"{\"sleep\":1}"))
        .await
        .unwrap();
    let e = error(&slow);
    assert_eq!(e["errorType"], "Sandbox.Timedout");
    assert_eq!(
        e["errorMessage"],
        format!("RequestId: {id} Error: Task timed out after 2.00 seconds")
    );
    let (_, again) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":5}"))
        .await
        .unwrap();
    assert_eq!(response(&again)["event"], serde_json::json!({"n": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_bounded_per_function() {
    let h = host(1);
    let s = spec(&h, Duration::from_secs(3));
    let slow = {
        let (h, s) = (h.clone(), s.clone());
        tokio::spawn(async move { h.invoke(&s, Bytes::from_static(b"{\"sleep\":1}")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The one instance allowed is busy: throttled at once, not queued.
    assert!(matches!(
        h.invoke(&s, Bytes::from_static(b"{}")).await,
        Err(HostError::TooMany)
    ));
    let _ = slow.await.unwrap();
    // Once it is gone, a new one may start.
    let (_, ok) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    assert_eq!(response(&ok)["event"], serde_json::json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_cannot_start_fails_its_invocation() {
    let h = host(2);
    let (sha, _) = h
        .store_code("123456789012", &zip_of(&[("bootstrap", "#!/bin/sh\ncurl -sS -X POST \"http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/init/error\" -d '{\"errorType\":\"Runtime.ConfigInvalid\",\"errorMessage\":\"no config\"}'\nexit 1\n", 0o755)]))
        .unwrap();
    let s = FunctionSpec {
        code_sha: sha,
        name: "broken".into(),
        ..spec(&h, Duration::from_secs(3))
    };
    let (_, o) = h.invoke(&s, Bytes::from_static(b"{}")).await.unwrap();
    assert_eq!(error(&o)["errorType"], "Runtime.ConfigInvalid");
    // Not a runtime the host runs.
    let s = FunctionSpec {
        runtime: "java21".into(),
        ..s
    };
    assert!(matches!(
        h.invoke(&s, Bytes::new()).await,
        Err(HostError::Runtime(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_api_takes_one_next_at_a_time_and_no_late_init_error() {
    let h = host(2);
    let s = spec(&h, Duration::from_secs(5));
    let (_, o) = h
        .invoke(&s, Bytes::from_static(b"{\"probe\":1}"))
        .await
        .unwrap();
    // Asked while its invocation is handed out: 403 both; the invocation is unharmed.
    assert_eq!(
        response(&o),
        serde_json::json!({"second_next": 403, "late_init_error": 403})
    );
    let (_, o) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    assert_eq!(response(&o)["event"], serde_json::json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_busy_when_its_function_changes_is_not_reused() {
    let h = host(2);
    let s = spec(&h, Duration::from_secs(5));
    let (_, first) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    let pid = response(&first)["pid"].clone();
    let busy = {
        let (h, s) = (h.clone(), s.clone());
        tokio::spawn(async move { h.invoke(&s, Bytes::from_static(b"{\"nap\":2}")).await })
    };
    // Changed (or deleted) while the instance works: once done, it is ended, not kept.
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.retire("123456789012", "echo");
    let (_, second) = busy.await.unwrap().unwrap();
    let (_, third) = h
        .invoke(&s, Bytes::from_static(b"{\"n\":3}"))
        .await
        .unwrap();
    assert_eq!(response(&second)["pid"], pid);
    assert_ne!(response(&third)["pid"], pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_run_only_for_the_accounts_allowed() {
    let dir = std::env::temp_dir().join(format!("sekisho-fn-{}", uuid::Uuid::new_v4().simple()));
    let h = Host::new(Config {
        dir,
        python: "python3".into(),
        node_ric: "aws-lambda-ric".into(),
        max_instances: 8,
        max_per_function: 2,
        max_per_account: 6,
        accounts: Some(["111111111111".to_string()].into()),
        env: BTreeMap::new(),
        authorizer_min_seconds: 300,
    });
    let s = spec(&h, Duration::from_secs(5));
    assert!(matches!(
        h.invoke(&s, Bytes::from_static(b"{}")).await,
        Err(HostError::Disabled)
    ));
}

/// A share in memory: (account, sha) → zip.
#[derive(Default)]
struct MemoryShare(std::sync::Mutex<BTreeMap<(String, String), Bytes>>);

impl sekisho_functions::CodeShare for MemoryShare {
    fn put(&self, account: &str, sha: &str, zip: Bytes) -> sekisho_functions::ShareFuture<()> {
        self.0
            .lock()
            .unwrap()
            .insert((account.into(), sha.into()), zip);
        Box::pin(async { Ok(()) })
    }

    fn get(
        &self,
        account: &str,
        sha: &str,
        _limit: usize,
    ) -> sekisho_functions::ShareFuture<Option<Bytes>> {
        let zip = self
            .0
            .lock()
            .unwrap()
            .get(&(account.into(), sha.into()))
            .cloned();
        Box::pin(async move { Ok(zip) })
    }

    fn sweep(
        &self,
        _account: &str,
        _keep: std::collections::BTreeSet<String>,
        _older_than: Duration,
    ) -> sekisho_functions::ShareFuture<usize> {
        Box::pin(async { Ok(0) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_stored_on_another_node_is_taken_from_the_share_only_if_its_hash_matches() {
    // Node 1 stores the code; node 2 (its own directory) has only the share.
    let (one, two) = (host(1), host(1));
    let share = Arc::new(MemoryShare::default());
    two.set_share(share.clone());
    let s = spec(&one, Duration::from_secs(3));
    let zip = zip_of(&[("bootstrap", BOOTSTRAP, 0o755)]);
    // Not shared yet: missing, as on a node without a share.
    match two.invoke(&s, Bytes::from_static(b"{}")).await {
        Err(HostError::Spawn(m)) => assert!(m.contains("missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Shared under its hash, but with other bytes: refused, nothing unpacked.
    let other = zip_of(&[("bootstrap", "#!/bin/sh\nexit 0\n", 0o755)]);
    use sekisho_functions::CodeShare as _;
    share
        .put(&s.account, &s.code_sha, Bytes::from(other))
        .await
        .unwrap();
    match two.invoke(&s, Bytes::from_static(b"{}")).await {
        Err(HostError::Spawn(m)) => assert!(m.contains("does not match"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The real code: node 2 unpacks it and runs it.
    share
        .put(&s.account, &s.code_sha, Bytes::from(zip))
        .await
        .unwrap();
    let (_, out) = two
        .invoke(&s, Bytes::from_static(b"{\"n\":7}"))
        .await
        .unwrap();
    assert_eq!(response(&out)["event"], serde_json::json!({"n": 7}));
    // Another account's function naming the same hash does not get this account's code.
    let theirs = FunctionSpec {
        account: "210987654321".into(),
        ..s.clone()
    };
    match two.invoke(&theirs, Bytes::from_static(b"{}")).await {
        Err(HostError::Spawn(m)) => assert!(m.contains("missing"), "{m}"),
        other => panic!("{other:?}"),
    }
}
