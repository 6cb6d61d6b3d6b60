//! Custom authentication of an MQTT connection (ALPN `mqtt` on the device HTTPS port, no
//! client certificate): the CONNECT's username names the authorizer and carries the token and
//! its signature in a query string, as the AWS IoT Device SDKs build it:
//! `[user]?x-amz-customauthorizer-name=<name>&x-amz-customauthorizer-signature=<sig>&<tokenKeyName>=<token>`
//! (values URL-encoded; SDK metrics such as `&SDK=PythonV2&Version=1.2.3` may follow and are
//! harmless). With no name, the account's default authorizer decides. The function gets the
//! username as sent, the password (base64) and the client id.

use sekisho_functions::authorizer::{self, Decision, Failure, Presented};

use crate::Shared;
use crate::conn::ConnInfo;

/// The query parameters of a username, decoded, in order (empty without a `?`).
pub fn username_params(username: &str) -> Vec<(String, String)> {
    let Some((_, query)) = username.split_once('?') else {
        return Vec::new();
    };
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

/// Why a custom-authenticated CONNECT is refused (its CONNACK code: bad user name or password,
/// or not authorized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No authorizer named, and none by default; or the one named does not exist.
    NoAuthorizer,
    /// The authorizer refused (signature, permission, the function's answer, or not
    /// authenticated).
    Denied(String),
}

/// Runs the account's authorizer for a CONNECT.
pub async fn authenticate(
    shared: &Shared,
    info: &ConnInfo,
    username: Option<&str>,
    password: Option<&[u8]>,
    client_id: &str,
) -> Result<Decision, Refused> {
    let Some(invoker) = shared.functions.get() else {
        return Err(Refused::Denied("functions are not served".into()));
    };
    let account = info.account.as_str();
    let params = username.map(username_params).unwrap_or_default();
    let param = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let registry = &shared.registry;
    let authorizer = match param("x-amz-customauthorizer-name") {
        Some(name) => registry.authorizer(account, &name),
        None => registry.default_authorizer(account),
    }
    .map_err(|_| Refused::NoAuthorizer)?;
    let token = authorizer
        .token_key_name
        .as_deref()
        .and_then(|k| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()));
    let presented = Presented {
        token,
        signature: param("x-amz-customauthorizer-signature"),
        http: None,
        mqtt: Some((
            username.map(str::to_owned),
            password.map(<[u8]>::to_vec),
            (!client_id.is_empty()).then(|| client_id.to_owned()),
        )),
        server_name: info.server_name.clone(),
    };
    match authorizer::authenticate(invoker, registry, account, &authorizer, &presented).await {
        Ok(d) if d.authenticated => Ok(d),
        Ok(_) => Err(Refused::Denied(
            "the authorizer did not authenticate it".into(),
        )),
        Err(Failure::InvalidResponse(m)) => Err(Refused::Denied(m)),
        Err(f) => Err(Refused::Denied(f.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
