//! MQTT 3.1.1 and 5.0 packets: decode, encode, validate.
//!
//! This crate is the one codec shared by the broker, the tests and the load tool. It is pure:
//! no sockets, no clock, no async runtime. Every decoder takes [`Limits`]; there is no
//! "unlimited". Violations are typed ([`DecodeError`]), carry the conformance statement they
//! break (`[MQTT-x.y.z-n]`) and map to the reason code a server must answer with.
//!
//! It must never: panic on any input, allocate more than the packet it was given, or know
//! anything about AWS policies or sockets.

#![warn(missing_docs)]

mod decode;
mod encode;
mod error;
mod packet;
mod properties;
pub mod reason;
pub mod topic;

pub use decode::{Limits, decode};
pub use encode::{EncodeError, PublishRef, encode, encode_publish};
pub use error::DecodeError;
pub use packet::*;
pub use properties::{Properties, UserProperty};

/// The protocol level negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte on the wire.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Quality of service. QoS 2 is representable because clients send it; the broker refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once (not supported by AWS IoT; decoded so that it can be refused properly).
    ExactlyOnce = 2,
}

impl QoS {
    /// From the two QoS bits; `None` for the invalid value 3.
    pub fn from_bits(b: u8) -> Option<QoS> {
        match b {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}
