//! Whole requests (method, path, query, headers, body) through SigV4 and SigV2, structured by
//! `arbitrary`. Never a panic, and:
//!
//! - raw mode: the request as given goes to `parse`, `verify` (all four option sets),
//!   `parse_v2_query` and `verify_v2_query` with a fixed secret and time; none of them may
//!   accept it, since nothing in the input can know the secret;
//! - signed modes: the same request is signed (Authorization header, or presigned query) for
//!   an arbitrary scope, signed-header set, date, expiry and security token, and `verify` must
//!   return exactly what the SigV4 rules say: `Ok` when every rule holds, else the first rule
//!   broken; the wrong secret, another method or another path never verify; and
//!   `sign_header` signs header requests the same way.
#![no_main]

use aws_lc_rs::{digest, hmac};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sekisho_sigv4::{
    MAX_PRESIGN_EXPIRES, MAX_SKEW_SECS, Options, Request, SigError, parse, parse_amz_date,
    parse_v2_query, sign_header, signing_key, string_to_sign, verify, verify_v2_query,
};

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
/// 2026-01-01T00:00:00Z.
const NOW: i64 = 1_767_225_600;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    mode: Mode,
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
    /// The V2 canonical resource.
    resource: &'a str,
    scope: Scope<'a>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    Raw,
    Header(Signing),
    Presigned(Signing),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Signing {
    s3: bool,
    token_outside_signature: bool,
    /// Seconds from NOW of the request's X-Amz-Date (folded into a few days).
    offset: i32,
    /// Which of the request's headers are signed (bit i: header i), and whether `host` is.
    signed_mask: u32,
    sign_host: bool,
    sign_amz_date: bool,
    sign_token: bool,
    content_sha: ContentSha,
    /// Presigned: X-Amz-Expires, folded into a range around the valid one.
    expires: Option<i32>,
    token: bool,
    /// Presigned with a token: sign as AWS IoT's WebSocket clients do, without the token.
    token_unsigned: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ContentSha {
    Absent,
    Right,
    RightUpper,
    Unsigned,
    Streaming,
    Wrong,
}

#[derive(Arbitrary, Debug)]
struct Scope<'a> {
    access_key: &'a str,
    region: &'a str,
    service: &'a str,
    token: &'a str,
    host: &'a str,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

fn hmac_hex(key: &[u8], msg: &str) -> String {
    hex::encode(hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        msg.as_bytes(),
    ))
}

fn owned(h: &[(&str, &str)]) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `yyyymmddThhmmssZ` of epoch seconds (proleptic Gregorian, days-from-civil inverted).
fn amz_date(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn raw(input: &Input<'_>) {
    let headers = owned(&input.headers);
    let body_sha = sha256_hex(input.body);
    // With the headers as given, and without any Authorization (the presigned path).
    let no_auth: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
        .cloned()
        .collect();
    for h in [&headers, &no_auth] {
        let req = Request {
            method: input.method,
            path: input.path,
            query: input.query,
            headers: h,
            body_sha256: &body_sha,
        };
        if let Ok(claim) = parse(&req) {
            for s3 in [false, true] {
                for token_outside_signature in [false, true] {
                    let opts = Options {
                        s3,
                        token_outside_signature,
                    };
                    let r = verify(&req, &claim, SECRET, NOW, opts);
                    assert_ne!(r, Ok(()), "an unsigned request verified: {req:?} {claim:?}");
                }
            }
            let _ = claim.scope();
        }
        if let Some(v2) = parse_v2_query(input.query) {
            let r = verify_v2_query(&req, input.resource, &v2, SECRET, NOW);
            assert_ne!(
                r,
                Ok(()),
                "an unsigned SigV2 request verified: {req:?} {v2:?}"
            );
        }
    }
    let _ = parse_amz_date(input.query);
}

/// A header name that can be listed in SignedHeaders: an HTTP token without `;` or `,`.
fn signable(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Query components the signing adds itself (whatever their encoding) are dropped.
fn ours(component: &str) -> bool {
    let k = component.split_once('=').map_or(component, |(k, _)| k);
    let k = percent_decode_str(&k.replace('+', "%20"))
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    k.starts_with("x-amz-")
}

fn signed(input: &Input<'_>, presigned: bool, s: Signing) {
    let sc = &input.scope;
    // A scope that survives the Authorization header's and the credential's syntax.
    if sc.access_key.is_empty()
        || [sc.access_key, sc.region, sc.service]
            .iter()
            .any(|p| p.contains('/') || (!presigned && (p.contains(',') || p.trim() != *p)))
    {
        return;
    }
    let t = NOW + i64::from(s.offset % (3 * 86_400));
    let date = amz_date(t);
    assert_eq!(parse_amz_date(&date), Some(t), "{date}");
    let day = &date[..8];
    let body_sha = sha256_hex(input.body);

    // Headers: the input's, minus those the signing sets, then ours.
    let reserved = [
        "authorization",
        "x-amz-date",
        "x-amz-content-sha256",
        "x-amz-security-token",
        "host",
    ];
    let mut headers: Vec<(String, String)> = owned(&input.headers)
        .into_iter()
        .filter(|(k, _)| !reserved.iter().any(|r| k.eq_ignore_ascii_case(r)))
        .collect();
    let mut names: Vec<String> = headers
        .iter()
        .enumerate()
        .filter(|(i, (k, _))| *i < 32 && s.signed_mask & (1 << i) != 0 && signable(k))
        .map(|(_, (k, _))| k.to_ascii_lowercase())
        .collect();
    headers.push(("Host".into(), sc.host.into()));
    if s.sign_host {
        names.push("host".into());
    }
    if !presigned {
        headers.push(("X-Amz-Date".into(), date.clone()));
        if s.sign_amz_date {
            names.push("x-amz-date".into());
        }
        if s.token {
            headers.push(("X-Amz-Security-Token".into(), sc.token.into()));
            if s.sign_token {
                names.push("x-amz-security-token".into());
            }
        }
    }
    let content_sha = match s.content_sha {
        ContentSha::Absent => None,
        ContentSha::Right => Some(body_sha.clone()),
        ContentSha::RightUpper => Some(body_sha.to_ascii_uppercase()),
        ContentSha::Unsigned => Some("UNSIGNED-PAYLOAD".to_owned()),
        ContentSha::Streaming => Some("STREAMING-AWS4-HMAC-SHA256-PAYLOAD".to_owned()),
        ContentSha::Wrong => Some(sha256_hex(b"not the body")),
    };
    if let Some(v) = &content_sha {
        headers.push(("x-amz-content-sha256".into(), v.clone()));
        // Always signed: an unsigned one is refused first, and that rule is tested above.
        names.push("x-amz-content-sha256".into());
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        // SignedHeaders= with nothing would parse as one empty name.
        names.push(String::new());
    }
    let signed_list = names.join(";");
    let opts = Options {
        s3: s.s3,
        token_outside_signature: s.token_outside_signature,
    };
    let expires = s.expires.map(|e| i64::from(e) % (MAX_PRESIGN_EXPIRES + 10));

    // The query: the input's (minus X-Amz-*), then the presigned parameters.
    let enc = |v: &str| utf8_percent_encode(v, NON_ALPHANUMERIC).to_string();
    let mut query: String = input
        .query
        .split('&')
        .filter(|c| !ours(c))
        .collect::<Vec<_>>()
        .join("&");
    let credential = format!(
        "{}/{day}/{}/{}/aws4_request",
        sc.access_key, sc.region, sc.service
    );
    if presigned {
        let mut p = vec![
            "X-Amz-Algorithm=AWS4-HMAC-SHA256".to_owned(),
            format!("X-Amz-Credential={}", enc(&credential)),
            format!("X-Amz-Date={date}"),
            format!("X-Amz-SignedHeaders={}", enc(&signed_list)),
        ];
        if let Some(e) = expires {
            p.push(format!("X-Amz-Expires={e}"));
        }
        if s.token {
            p.push(format!("X-Amz-Security-Token={}", enc(sc.token)));
        }
        for c in p {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(&c);
        }
    } else {
        headers.push((
            "Authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_list}, Signature=00"
            ),
        ));
    }

    // Parsed first with a placeholder signature (the canonical query leaves it out).
    let query_unsigned = if presigned {
        format!("{query}&X-Amz-Signature=00")
    } else {
        query.clone()
    };
    let mut req = Request {
        method: input.method,
        path: input.path,
        query: &query_unsigned,
        headers: &headers,
        body_sha256: &body_sha,
    };
    let claim = parse(&req).unwrap_or_else(|e| panic!("own request does not parse: {e:?}"));
    assert_eq!(claim.access_key, sc.access_key);
    assert_eq!(claim.region, sc.region);
    assert_eq!(claim.service, sc.service);
    assert_eq!(claim.amz_date, date);
    assert_eq!(claim.presigned, presigned);
    assert_eq!(claim.signed_headers, names);
    let drop_token = presigned && s.token && s.token_unsigned;
    let key = signing_key(SECRET, day, sc.region, sc.service);
    let signature = hmac_hex(&key, &string_to_sign(&req, &claim, opts, drop_token));

    let query_signed;
    let mut headers_signed = headers.clone();
    if presigned {
        query_signed = format!("{query}&X-Amz-Signature={signature}");
        req.query = &query_signed;
    } else {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_list}, Signature={signature}"
        );
        if !s.s3 {
            // Our own signer agrees (it signs the request without its Authorization).
            let unsigned = Request {
                headers: &headers[..headers.len() - 1],
                ..req.clone()
            };
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let by_lib = sign_header(
                &unsigned,
                sc.access_key,
                SECRET,
                sc.region,
                sc.service,
                &date,
                &names,
            );
            assert_eq!(by_lib, auth);
        }
        if let Some(last) = headers_signed.last_mut() {
            last.1 = auth;
        }
        req.headers = &headers_signed;
    }
    let claim = parse(&req).unwrap_or_else(|e| panic!("signed request does not parse: {e:?}"));
    assert_eq!(claim.signature, signature);

    // What the rules say, in verify's order.
    let unsigned_amz = headers.iter().find_map(|(k, _)| {
        let k = k.to_ascii_lowercase();
        (k.starts_with("x-amz-") && !names.contains(&k)).then_some(k)
    });
    let exp_window = match expires {
        Some(e) => Some(e),
        None if s.s3 => None,
        None => Some(MAX_SKEW_SECS),
    };
    let payload_ok = content_sha.as_deref().is_none_or(|h| {
        h.starts_with("UNSIGNED-PAYLOAD")
            || h.starts_with("STREAMING-")
            || h.eq_ignore_ascii_case(&body_sha)
    });
    let token_ok = !drop_token || s.token_outside_signature;
    let expected: Result<(), &str> = if !names.iter().any(|n| n == "host") {
        Err("host")
    } else if (presigned || s.s3) && unsigned_amz.is_some() {
        Err("unsigned")
    } else if presigned && !exp_window.is_some_and(|e| (1..=MAX_PRESIGN_EXPIRES).contains(&e)) {
        // Missing where S3 requires it, or out of range.
        Err("incomplete")
    } else if presigned && NOW > t + exp_window.unwrap_or(0) {
        Err("expired")
    } else if (presigned && t > NOW + MAX_SKEW_SECS)
        || (!presigned && (NOW - t).abs() > MAX_SKEW_SECS)
    {
        Err("skewed")
    } else if !payload_ok {
        Err("payload")
    } else if !token_ok {
        Err("mismatch")
    } else {
        Ok(())
    };
    let got = verify(&req, &claim, SECRET, NOW, opts);
    let got_kind = got.as_ref().map(|_| ()).map_err(|e| match e {
        SigError::Incomplete(m) if m.contains("'Host'") => "host",
        SigError::Incomplete(_) => "incomplete",
        SigError::UnsignedHeaders(_) => "unsigned",
        SigError::Expired => "expired",
        SigError::Skewed(_) => "skewed",
        SigError::PayloadHash => "payload",
        SigError::Mismatch => "mismatch",
        SigError::Missing => "missing",
    });
    assert_eq!(got_kind, expected, "{got:?} for {req:?} {claim:?} {opts:?}");

    if got.is_ok() {
        // The wrong secret, another method, another path: never.
        assert_eq!(
            verify(&req, &claim, "another secret", NOW, opts),
            Err(SigError::Mismatch)
        );
        let method = format!("{}X", input.method);
        let other = Request {
            method: &method,
            ..req.clone()
        };
        assert_eq!(
            verify(&other, &claim, SECRET, NOW, opts),
            Err(SigError::Mismatch)
        );
        let path = format!("{}/x", input.path);
        let other = Request {
            path: &path,
            ..req.clone()
        };
        assert_eq!(
            verify(&other, &claim, SECRET, NOW, opts),
            Err(SigError::Mismatch)
        );
    }
}

fuzz_target!(|input: Input<'_>| {
    match input.mode {
        Mode::Raw => raw(&input),
        Mode::Header(s) => signed(&input, false, s),
        Mode::Presigned(s) => signed(&input, true, s),
    }
});
