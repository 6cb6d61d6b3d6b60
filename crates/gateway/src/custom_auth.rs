//! Custom authentication of device connections and requests that carry neither a client
//! certificate nor a SigV4 signature, on one of an account's data endpoints (the server name
//! says which), as on AWS's port 443:
//!
//! - MQTT with ALPN `mqtt`: the CONNECT's username names the authorizer and carries the token
//!   and its signature in a query string, as the AWS IoT Device SDKs build it:
//!   `[user]?x-amz-customauthorizer-name=<name>&x-amz-customauthorizer-signature=<sig>&<tokenKeyName>=<token>`
//!   (values URL-encoded; SDK metrics such as `&SDK=PythonV2&Version=1.2.3` may follow and are
//!   harmless). The function gets the username as sent, the password (base64) and the client
//!   id.
//! - MQTT over WebSocket: the same names as headers or query parameters of the upgrade; or,
//!   if the upgrade carries none, the CONNECT's username and password as above.
//! - HTTPS: the same names as headers or query parameters of each request.
//!
//! With no name, the account's default authorizer decides. A name, signature or token given
//! twice (twice in the headers, or in a header and the query string) is refused: what is
//! verified must be what the function reads. The headers that go to the function total at most
//! [`MAX_HEADERS`] bytes. A connection keeps what it presented, and its authorizer is asked
//! again every `refreshAfterInSeconds`: a refusal then ends the connection.

use sekisho_functions::authorizer::{self, Decision, Failure, Presented};
use sekisho_registry::Authorizer;

use crate::Shared;

/// The name of the authorizer, as a query parameter or header.
const NAME: &str = "x-amz-customauthorizer-name";
/// The token's signature, as a query parameter or header.
const SIGNATURE: &str = "x-amz-customauthorizer-signature";
/// The most header bytes (names and values) a request may send a custom authorizer.
pub const MAX_HEADERS: usize = 16 * 1024;

/// The query parameters of a username, decoded, in order (empty without a `?`).
pub fn username_params(username: &str) -> Vec<(String, String)> {
    let Some((_, query)) = username.split_once('?') else {
        return Vec::new();
    };
    query_params(query)
}

/// The parameters of a query string, decoded, in order. A `+` stays a `+` (a signature is
/// base64).
fn query_params(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', "%2B"))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How many times `name` is given (without case for headers and the reserved names; exactly
/// for a query's token key).
fn count(params: &[(String, String)], name: &str, exact: bool) -> usize {
    params
        .iter()
        .filter(|(n, _)| {
            if exact {
                n == name
            } else {
                n.eq_ignore_ascii_case(name)
            }
        })
        .count()
}

/// Why custom authentication refused (MQTT: CONNACK bad user name or password, or not
/// authorized; HTTP: 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No authorizer named, and none by default; or the one named does not exist.
    NoAuthorizer,
    /// The authorizer refused (signature, permission, the function's answer, or not
    /// authenticated), or what was presented is ambiguous or too large.
    Denied(String),
    /// Every instance of the function is busy: no answer, neither yes nor no.
    Busy,
}

/// What a custom-authenticated connection presented, kept to present again when its
/// authorizer's answer is due for a refresh.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The authorizer that decided.
    pub authorizer: String,
    /// Its creation time: asked again, it must be the same incarnation of the name.
    pub created: f64,
    /// What was presented to it (with the connection's id, the same at each refresh).
    pub presented: Presented,
}

/// How a device connection without a certificate or signature authenticates.
#[derive(Debug, Clone)]
pub enum CustomAuth {
    /// At CONNECT, by its username and password.
    AtConnect,
    /// Already, by what the WebSocket upgrade carried.
    Decided(Box<(Credentials, Decision)>),
}

/// The authorizer named, or the account's default.
pub fn resolve(shared: &Shared, account: &str, name: Option<&str>) -> Result<Authorizer, Refused> {
    match name {
        Some(name) => shared.registry.authorizer(account, name),
        None => shared.registry.default_authorizer(account),
    }
    .map_err(|_| Refused::NoAuthorizer)
}

/// The authorizer an MQTT CONNECT's username names, if any.
pub fn connect_name(username: Option<&str>) -> Option<String> {
    let params = username.map(username_params).unwrap_or_default();
    param(&params, NAME).map(str::to_owned)
}

/// The credentials an MQTT CONNECT presents to `authorizer`; refused if its username names
/// the authorizer, the signature or the token more than once.
pub fn connect_presented(
    authorizer: &Authorizer,
    username: Option<&str>,
    password: Option<&[u8]>,
    client_id: &str,
    server_name: Option<String>,
) -> Result<Presented, Refused> {
    let params = username.map(username_params).unwrap_or_default();
    if count(&params, NAME, false) > 1
        || count(&params, SIGNATURE, false) > 1
        || authorizer
            .token_key_name
            .as_deref()
            .is_some_and(|k| count(&params, k, true) > 1)
    {
        return Err(Refused::Denied(
            "the username gives a custom authorization parameter twice".into(),
        ));
    }
    let token = authorizer
        .token_key_name
        .as_deref()
        .and_then(|k| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()));
    Ok(Presented {
        token,
        signature: param(&params, SIGNATURE).map(str::to_owned),
        http: None,
        mqtt: Some((
            username.map(str::to_owned),
            password.map(<[u8]>::to_vec),
            (!client_id.is_empty()).then(|| client_id.to_owned()),
        )),
        server_name,
        connection_id: Some(uuid::Uuid::new_v4().to_string()),
    })
}

/// The authorizer an HTTP request (or WebSocket upgrade) names by header or query parameter.
pub fn http_name(headers: &[(String, String)], query: &str) -> Option<String> {
    param(headers, NAME)
        .map(str::to_owned)
        .or_else(|| param(&query_params(query), NAME).map(str::to_owned))
}

/// Whether an HTTP request (or WebSocket upgrade) carries anything for `authorizer`: its
/// name, a signature, or its token.
pub fn http_carries(authorizer: &Authorizer, headers: &[(String, String)], query: &str) -> bool {
    let params = query_params(query);
    let present = |k: &str| param(headers, k).is_some() || param(&params, k).is_some();
    present(NAME)
        || present(SIGNATURE)
        || authorizer
            .token_key_name
            .as_deref()
            .is_some_and(|k| param(headers, k).is_some() || params.iter().any(|(n, _)| n == k))
}

/// The credentials an HTTP request (or WebSocket upgrade) presents to `authorizer`: token and
/// signature from a header or the query string; every header and the query string go to the
/// function. Refused if the name, the signature or the token is given more than once
/// (whether twice as a header, or as a header and in the query), or if the headers are
/// larger than [`MAX_HEADERS`].
pub fn http_presented(
    authorizer: &Authorizer,
    headers: &[(String, String)],
    query: &str,
    server_name: Option<String>,
) -> Result<Presented, Refused> {
    let params = query_params(query);
    let twice = |name: &str, exact_in_query: bool| {
        count(headers, name, false) + count(&params, name, exact_in_query) > 1
    };
    if twice(NAME, false)
        || twice(SIGNATURE, false)
        || authorizer
            .token_key_name
            .as_deref()
            .is_some_and(|k| twice(k, true))
    {
        return Err(Refused::Denied(
            "a custom authorization parameter is given twice".into(),
        ));
    }
    if headers
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        > MAX_HEADERS
    {
        return Err(Refused::Denied(
            "the headers are too large for a custom authorizer".into(),
        ));
    }
    let token = authorizer.token_key_name.as_deref().and_then(|k| {
        param(headers, k)
            .map(str::to_owned)
            .or_else(|| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    });
    let signature = param(headers, SIGNATURE)
        .or_else(|| param(&params, SIGNATURE))
        .map(str::to_owned);
    let query_string = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    Ok(Presented {
        token,
        signature,
        http: Some((headers.to_vec(), query_string)),
        mqtt: None,
        server_name,
        connection_id: Some(uuid::Uuid::new_v4().to_string()),
    })
}

/// Runs `authorizer` on what was presented.
pub async fn run(
    shared: &Shared,
    account: &str,
    authorizer: &Authorizer,
    presented: &Presented,
) -> Result<Decision, Refused> {
    let Some(invoker) = shared.functions.get() else {
        return Err(Refused::Denied("functions are not served".into()));
    };
    match authorizer::authenticate(invoker, &shared.registry, account, authorizer, presented).await
    {
        Ok(d) if d.authenticated => Ok(d),
        Ok(_) => Err(Refused::Denied(
            "the authorizer did not authenticate it".into(),
        )),
        Err(Failure::Throttled) => Err(Refused::Busy),
        Err(Failure::InvalidResponse(m)) => Err(Refused::Denied(m)),
        Err(f) => Err(Refused::Denied(f.to_string())),
    }
}

/// Asks a connection's authorizer again, with what the connection presented: the same
/// incarnation of its name, or none.
pub async fn again(
    shared: &Shared,
    account: &str,
    credentials: &Credentials,
) -> Result<Decision, Refused> {
    let authorizer = resolve(shared, account, Some(&credentials.authorizer))?;
    if authorizer.created != credentials.created {
        return Err(Refused::NoAuthorizer);
    }
    run(shared, account, &authorizer, &credentials.presented).await
}

/// Authenticates an MQTT CONNECT by its username and password.
pub async fn connect(
    shared: &Shared,
    account: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
    client_id: &str,
    server_name: Option<String>,
) -> Result<(Credentials, Decision), Refused> {
    let authorizer = resolve(shared, account, connect_name(username).as_deref())?;
    let presented = connect_presented(&authorizer, username, password, client_id, server_name)?;
    let decision = run(shared, account, &authorizer, &presented).await?;
    Ok((
        Credentials {
            authorizer: authorizer.name,
            created: authorizer.created,
            presented,
        },
        decision,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn authorizer(token_key: Option<&str>) -> Authorizer {
        Authorizer {
            name: "a".into(),
            function_arn: String::new(),
            token_key_name: token_key.map(str::to_owned),
            signing_keys: Default::default(),
            active: true,
            signing_disabled: false,
            caching_for_http: false,
            created: 0.0,
            modified: 0.0,
        }
    }

    #[test]
    fn usernames_carry_the_authorizer_and_token_as_the_sdks_build_them() {
        let p = username_params(
            "dev?x-amz-customauthorizer-name=tokens&x-amz-customauthorizer-signature=ab%2Bc%2F%3D&token=tok-1&SDK=PythonV2&Version=1.2.3",
        );
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("x-amz-customauthorizer-name"), Some("tokens"));
        assert_eq!(get("x-amz-customauthorizer-signature"), Some("ab+c/="));
        assert_eq!(get("token"), Some("tok-1"));
        assert_eq!(get("SDK"), Some("PythonV2"));
        // A `+` in a value is a `+` (base64), not a space.
        let p = username_params("?s=a+b");
        assert_eq!(p, vec![("s".to_string(), "a+b".to_string())]);
        assert!(username_params("plain").is_empty());
        assert_eq!(
            username_params("u?flag"),
            vec![("flag".to_string(), String::new())]
        );
    }

    #[test]
    fn http_credentials_come_from_a_header_or_the_query_never_both() {
        let a = authorizer(Some("Token"));
        let headers = vec![
            ("x-amz-customauthorizer-name".to_string(), "h".to_string()),
            ("token".to_string(), "from-header".to_string()),
        ];
        // Header names are matched without case; query names exactly for the token.
        let p = http_presented(&a, &headers, "x-amz-customauthorizer-signature=s%2B", None)
            .expect("one of each");
        assert_eq!(p.token.as_deref(), Some("from-header"));
        assert_eq!(p.signature.as_deref(), Some("s+"));
        assert_eq!(
            p.http.as_ref().map(|(_, q)| q.as_str()),
            Some("?x-amz-customauthorizer-signature=s%2B")
        );
        assert!(p.connection_id.is_some());
        assert_eq!(http_name(&headers, ""), Some("h".to_string()));
        let p = http_presented(&a, &[], "Token=from-query", None).expect("one token");
        assert_eq!(p.token.as_deref(), Some("from-query"));
        let p = http_presented(&a, &[], "token=x", None).expect("no token");
        assert_eq!(p.token, None);
        // Twice: in a header and the query, twice in the headers, twice in the query.
        for (h, q) in [
            (&headers[..], "Token=other"),
            (&headers[..], "X-Amz-CustomAuthorizer-Name=other"),
            (&[][..], "Token=a&Token=b"),
            (
                &[][..],
                "x-amz-customauthorizer-signature=a&x-amz-customauthorizer-signature=a",
            ),
        ] {
            assert!(http_presented(&a, h, q, None).is_err(), "{h:?} {q}");
        }
        let doubled = vec![
            ("token".to_string(), "a".to_string()),
            ("TOKEN".to_string(), "b".to_string()),
        ];
        assert!(http_presented(&a, &doubled, "", None).is_err());
        // The headers' size: at the bound taken, past it refused.
        let fill = |n: usize| vec![("x".to_string(), "y".repeat(n - 1))];
        assert!(http_presented(&a, &fill(MAX_HEADERS), "", None).is_ok());
        assert!(http_presented(&a, &fill(MAX_HEADERS + 1), "", None).is_err());
        assert_eq!(
            http_name(&[], "x-amz-customauthorizer-name=q"),
            Some("q".to_string())
        );
        assert!(http_carries(&a, &[], "Token=1"));
        assert!(!http_carries(&a, &[], "other=1"));
        assert!(!http_carries(
            &authorizer(None),
            &[("token".into(), "1".into())],
            ""
        ));
    }

    #[test]
    fn a_connect_presents_its_username_password_and_client_id() {
        let a = authorizer(Some("token"));
        let u = "dev?x-amz-customauthorizer-name=n&x-amz-customauthorizer-signature=c2ln&token=t";
        assert_eq!(connect_name(Some(u)), Some("n".to_string()));
        assert_eq!(connect_name(Some("dev")), None);
        let p = connect_presented(&a, Some(u), Some(b"pw"), "", Some("sni".into()))
            .expect("one of each");
        assert_eq!(p.token.as_deref(), Some("t"));
        assert_eq!(p.signature.as_deref(), Some("c2ln"));
        let (user, pass, client) = p.mqtt.unwrap_or_default();
        assert_eq!(user.as_deref(), Some(u));
        assert_eq!(pass.as_deref(), Some(&b"pw"[..]));
        assert_eq!(client, None);
        assert_eq!(p.server_name.as_deref(), Some("sni"));
        for twice in [
            "d?token=a&token=b",
            "d?x-amz-customauthorizer-name=n&X-AMZ-CUSTOMAUTHORIZER-NAME=m",
            "d?x-amz-customauthorizer-signature=a&x-amz-customauthorizer-signature=b",
        ] {
            assert!(
                connect_presented(&a, Some(twice), None, "c", None).is_err(),
                "{twice}"
            );
        }
    }
}
