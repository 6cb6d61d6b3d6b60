//! The identifiers that cross crate boundaries, as distinct types: an account id, a
//! certificate id and an MQTT client id are all strings, and a function that takes two or three
//! of them side by side (`certificate_usable(account, certificate)`,
//! `Principal::certificate(account, certificate, client)`) must not accept them swapped.
//!
//! Each type reads as `&str` (`Deref`), so code that only reads an id needs no conversion;
//! making one is explicit (`AccountId::new`). The types carry no validation: what a valid id
//! is belongs to the component that issues it (the registry for accounts and certificates,
//! the MQTT codec for client ids).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id issued elsewhere.
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id!(
    /// An account id: twelve digits, issued by the registry.
    AccountId
);
id!(
    /// A certificate id: the SHA-256 of the certificate's DER, 64 hex digits.
    CertificateId
);
id!(
    /// An MQTT client id, as the client sent it in CONNECT.
    ClientId
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ids_read_as_text_and_look_up_by_text() {
        let a = AccountId::new("123456789012");
        assert_eq!(a, "123456789012");
        assert_eq!(a.len(), 12);
        assert_eq!(format!("{a}"), "123456789012");
        let mut m: HashMap<AccountId, u8> = HashMap::new();
        m.insert(a.clone(), 1);
        assert_eq!(m.get("123456789012"), Some(&1));
        assert_eq!(a.into_string(), "123456789012");
    }
}
