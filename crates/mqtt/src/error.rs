use crate::reason;

/// Why a byte sequence is not a valid MQTT packet. Each variant names the conformance
/// statement it breaks and maps to the reason code a server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The remaining length is longer than four bytes. [MQTT-1.5.5-1]
    #[error("[MQTT-1.5.5-1] malformed variable byte integer")]
    MalformedVarInt,
    /// The packet is larger than the negotiated maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Size announced by the fixed header.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// Reserved packet type 0, or AUTH on MQTT 3.1.1. [MQTT-2.1.3-1]
    #[error("[MQTT-2.1.3-1] invalid packet type {0}")]
    InvalidPacketType(u8),
    /// The fixed-header flags are not the reserved values for this packet type. [MQTT-2.1.3-1]
    #[error("[MQTT-2.1.3-1] invalid fixed header flags {flags:#06b} for packet type {packet_type}")]
    InvalidHeaderFlags {
        /// Packet type.
        packet_type: u8,
        /// The flags received.
        flags: u8,
    },
    /// A field runs past the end of the packet.
    #[error("[MQTT-1.5.4] packet truncated: {0} runs past the remaining length")]
    Truncated(&'static str),
    /// Bytes remain after the last field.
    #[error("[MQTT-2.1.4] {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A UTF-8 string is not well-formed. [MQTT-1.5.4-1]
    #[error("[MQTT-1.5.4-1] string is not well-formed UTF-8")]
    InvalidUtf8,
    /// A UTF-8 string contains U+0000. [MQTT-1.5.4-2]
    #[error("[MQTT-1.5.4-2] string contains the null character")]
    NullCharacter,
    /// The protocol name is not "MQTT". [MQTT-3.1.2-1]
    #[error("[MQTT-3.1.2-1] protocol name is not MQTT")]
    InvalidProtocolName,
    /// Protocol level other than 4 or 5. [MQTT-3.1.2-2]
    #[error("[MQTT-3.1.2-2] unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// The CONNECT reserved flag is set. [MQTT-3.1.2-3]
    #[error("[MQTT-3.1.2-3] CONNECT reserved flag is set")]
    ConnectReservedFlag,
    /// Will QoS or Will Retain set without the Will flag, or Will QoS 3. [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]
    #[error("[MQTT-3.1.2-13] invalid will flags")]
    InvalidWillFlags,
    /// Password flag set without the user name flag (MQTT 3.1.1). [MQTT-3.1.2-22]
    #[error("[MQTT-3.1.2-22] password flag set without user name flag")]
    PasswordWithoutUsername,
    /// QoS bits are 3. [MQTT-3.3.1-4]
    #[error("[MQTT-3.3.1-4] invalid QoS 3")]
    InvalidQoS,
    /// DUP set on a QoS 0 PUBLISH. [MQTT-3.3.1-2]
    #[error("[MQTT-3.3.1-2] DUP flag set on a QoS 0 message")]
    DupOnQoS0,
    /// Packet identifier 0. [MQTT-2.2.1-3]
    #[error("[MQTT-2.2.1-3] packet identifier is zero")]
    ZeroPacketId,
    /// The topic name has wildcard characters. [MQTT-3.3.2-2]
    #[error("[MQTT-3.3.2-2] topic name contains wildcard characters")]
    WildcardInTopicName,
    /// The topic name is empty and no topic alias is given. [MQTT-4.7.3-1]
    #[error("[MQTT-4.7.3-1] topic name is empty")]
    EmptyTopicName,
    /// A topic filter is not well formed. [MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-4.7.3-1]
    #[error("[MQTT-4.7.1-1] topic filter {0:?} is not well formed")]
    InvalidTopicFilter(String),
    /// SUBSCRIBE or UNSUBSCRIBE without any filter. [MQTT-3.8.3-3] [MQTT-3.10.3-2]
    #[error("[MQTT-3.8.3-3] SUBSCRIBE/UNSUBSCRIBE carries no topic filter")]
    NoTopicFilters,
    /// Reserved bits in subscription options are set, or QoS 3, or retain handling 3. [MQTT-3.8.3-5]
    #[error("[MQTT-3.8.3-5] invalid subscription options {0:#010b}")]
    InvalidSubscriptionOptions(u8),
    /// More filters in one packet than the limit allows.
    #[error("{count} topic filters in one packet exceed the limit of {max}")]
    TooManyFilters {
        /// Filters found so far.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More user properties than the limit allows.
    #[error("more than {0} user properties")]
    TooManyUserProperties(usize),
    /// An unknown property identifier. [MQTT-2.2.2-1]
    #[error("[MQTT-2.2.2-1] unknown property identifier {0:#04x}")]
    UnknownProperty(u8),
    /// A property that may not appear in this packet.
    #[error("[MQTT-2.2.2-1] property {id:#04x} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// Property identifier.
        id: u8,
        /// Packet name.
        packet: &'static str,
    },
    /// A property that may appear once appeared twice.
    #[error("[MQTT-2.2.2-1] property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    /// A property value outside its allowed range (for example Receive Maximum 0).
    #[error("property {0:#04x} has an invalid value")]
    InvalidPropertyValue(u8),
    /// A reason code that is not defined for this packet.
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode {
        /// Reason code.
        code: u8,
        /// Packet name.
        packet: &'static str,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code a server sends (in CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> u8 {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            UnsupportedProtocolVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            WildcardInTopicName | EmptyTopicName => reason::TOPIC_NAME_INVALID,
            InvalidTopicFilter(_) => reason::TOPIC_FILTER_INVALID,
            TooManyFilters { .. } | TooManyUserProperties(_) => reason::QUOTA_EXCEEDED,
            DuplicateProperty(_)
            | PropertyNotAllowed { .. }
            | InvalidPropertyValue(_)
            | ZeroPacketId
            | InvalidQoS
            | DupOnQoS0
            | NoTopicFilters => reason::PROTOCOL_ERROR,
            _ => reason::MALFORMED_PACKET,
        }
    }
}
