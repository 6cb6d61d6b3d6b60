//! Arbitrary Authorization headers and query strings: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_sigv4::{Options, Request, parse, verify, EMPTY_SHA256};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (auth, query) = s.split_once('\n').unwrap_or((s, ""));
    let headers = vec![
        ("host".to_string(), "localhost".to_string()),
        ("authorization".to_string(), auth.to_string()),
        ("x-amz-date".to_string(), "20260101T000000Z".to_string()),
    ];
    for h in [&headers[..], &headers[..1]] {
        let req = Request { method: "GET", path: "/a%2Fb", query, headers: h, body_sha256: EMPTY_SHA256 };
        if let Ok(c) = parse(&req) {
            let _ = verify(&req, &c, "secret", 1_767_225_600, Options::default());
        }
    }
});
