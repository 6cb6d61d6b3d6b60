//! The `bootstrap` of a compiled (`provided.al2023`) Lambda function, for
//! `bench/authorizers.py`: it speaks the Lambda Runtime API (next invocation, response) over
//! one kept-alive HTTP/1.1 connection and decides custom-authorizer events as the benchmark's
//! Python handler does: a device `dev-<i>` whose password is `pw-dev-<i>` is authenticated,
//! with a policy that lets it connect as itself and use `bench/dev-<i>`; anyone else is not.
//! Standard library and serde_json only, so that it is what a compiled handler costs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use serde_json::{Value, json};

/// One connection to the Runtime API, opened again when it fails.
struct Api {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

/// A response: its headers (lower-case names) and body.
type Answer = (Vec<(String, String)>, Vec<u8>);

impl Api {
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
        let mut last = None;
        for _ in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(&self.addr)?;
                s.set_nodelay(true)?;
                self.conn = Some(BufReader::new(s));
            }
            match self.exchange(method, path, body) {
                Ok(a) => return Ok(a),
                Err(e) => {
                    self.conn = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
    }

    fn exchange(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
            self.addr,
            body.len()
        );
        let s = conn.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !line.starts_with("HTTP/1.1 2") {
            return Err(std::io::Error::other(format!(
                "runtime API: {}",
                line.trim()
            )));
        }
        let mut headers = Vec::new();
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .ok_or_else(|| std::io::Error::other("runtime API answer without Content-Length"))?;
        let mut out = vec![0; len];
        conn.read_exact(&mut out)?;
        Ok((headers, out))
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(char::from(A[((n >> shift) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The authorizer's answer to `event`, for the function `arn`.
fn decide(event: &Value, arn: &str) -> Value {
    let mqtt = &event["protocolData"]["mqtt"];
    let user = mqtt["username"]
        .as_str()
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    let password = mqtt["password"].as_str().unwrap_or_default();
    let Some(n) = user.strip_prefix("dev-").filter(|n| {
        !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && password == base64(format!("pw-{user}").as_bytes())
    }) else {
        return json!({"isAuthenticated": false});
    };
    let account = arn.split(':').nth(4).unwrap_or_default();
    let res = format!("arn:aws:iot:us-east-1:{account}");
    let policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("{res}:client/{user}")},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": format!("{res}:topic/bench/{user}")},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": format!("{res}:topicfilter/bench/{user}")}]});
    json!({"isAuthenticated": true, "principalId": format!("dev{n}"), "refreshAfterInSeconds": 300,
           "disconnectAfterInSeconds": 3600, "policyDocuments": [policy.to_string()]})
}

fn main() {
    let Ok(addr) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        eprintln!("AWS_LAMBDA_RUNTIME_API is not set: run me as a Lambda function's bootstrap");
        std::process::exit(2);
    };
    let mut api = Api { addr, conn: None };
    loop {
        let (headers, body) = match api.request("GET", "/2018-06-01/runtime/invocation/next", b"") {
            Ok(a) => a,
            Err(e) => {
                eprintln!("next invocation: {e}");
                std::process::exit(1);
            }
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let id = header("lambda-runtime-aws-request-id");
        let arn = header("lambda-runtime-invoked-function-arn");
        let answer = match serde_json::from_slice::<Value>(&body) {
            Ok(event) => decide(&event, &arn),
            Err(_) => json!({"isAuthenticated": false}),
        };
        let path = format!("/2018-06-01/runtime/invocation/{id}/response");
        if let Err(e) = api.request("POST", &path, answer.to_string().as_bytes()) {
            eprintln!("response: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648_says() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn decides_as_the_python_handler() {
        let arn = "arn:aws:lambda:us-east-1:123456789012:function:f";
        let ev = |u: &str, p: &str| json!({"protocolData": {"mqtt": {"username": u, "password": base64(p.as_bytes())}}});
        let yes = decide(&ev("dev-7?x-amz-customauthorizer-name=a", "pw-dev-7"), arn);
        assert_eq!(
            (
                yes["isAuthenticated"].as_bool(),
                yes["principalId"].as_str()
            ),
            (Some(true), Some("dev7"))
        );
        assert!(
            yes["policyDocuments"][0]
                .as_str()
                .unwrap()
                .contains(":123456789012:client/dev-7")
        );
        for (u, p) in [
            ("dev-7", "pw-dev-8"),
            ("dev-x", "pw-dev-x"),
            ("dev-", "pw-dev-"),
            ("eve", "pw-eve"),
        ] {
            assert_eq!(
                decide(&ev(u, p), arn)["isAuthenticated"],
                json!(false),
                "{u}"
            );
        }
    }
}
