//! Arbitrary Authorization headers and query strings (`<authorization>\n<query>`), SigV4 and
//! SigV2: never a panic, and never accepted (nothing in the input can know the secret).
//! `sigv4_request` drives whole structured requests, signed and unsigned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_sigv4::{
    EMPTY_SHA256, Options, Request, parse, parse_v2_query, verify, verify_v2_query,
};

const NOW: i64 = 1_767_225_600;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (auth, query) = s.split_once('\n').unwrap_or((s, ""));
    let headers = [
        ("host".to_string(), "localhost".to_string()),
        ("authorization".to_string(), auth.to_string()),
        ("x-amz-date".to_string(), "20260101T000000Z".to_string()),
    ];
    for h in [&headers[..], &headers[..1]] {
        let req = Request {
            method: "GET",
            path: "/a%2Fb",
            query,
            headers: h,
            body_sha256: EMPTY_SHA256,
        };
        if let Ok(c) = parse(&req) {
            for s3 in [false, true] {
                let opts = Options {
                    s3,
                    token_outside_signature: true,
                };
                assert_ne!(verify(&req, &c, "secret", NOW, opts), Ok(()));
            }
        }
        if let Some(c) = parse_v2_query(query) {
            assert_ne!(
                verify_v2_query(&req, "/bucket/a%2Fb", &c, "secret", NOW),
                Ok(())
            );
        }
    }
});
