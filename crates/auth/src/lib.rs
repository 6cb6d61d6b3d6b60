//! The trust boundary, below every protocol that reaches Sekisho (control plane, S3, device
//! HTTPS, MQTT over TLS and WebSocket):
//!
//! - [`authn`]: who a SigV4/SigV2-signed request is ([`authn::Caller`]), parsed and verified
//!   once; whether credentials a live session was opened with still hold
//!   ([`authn::still_valid`]); the one IAM decision ([`authn::is_authorized`]) with one set of
//!   condition keys for every kind of caller ([`authn::RequestContext`], [`authn::context_keys`]).
//! - [`authz`]: a connection's principal (a certificate's IoT policies, or an IAM caller's
//!   identity policies) bound with its variables, re-checked as the registry changes.
//! - [`http`]: deadlines and bounds on what is read before authentication.

#![warn(missing_docs)]

pub mod authn;
pub mod authz;
pub mod http;
