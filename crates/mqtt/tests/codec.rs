#![allow(clippy::unwrap_used)]
#![allow(clippy::field_reassign_with_default)]
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sekisho_mqtt::*;

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn dec(bytes: &[u8], v: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut b = BytesMut::from(bytes);
    decode(&mut b, v, &Limits::default())
}

fn roundtrip(p: &Packet, v: ProtocolVersion) -> Packet {
    let mut b = BytesMut::new();
    encode(p, v, &mut b).expect("encode");
    let out = decode(&mut b, v, &Limits::default())
        .expect("decode")
        .expect("whole packet");
    assert!(b.is_empty(), "decoder must consume exactly one packet");
    out
}

#[test]
fn connect_v311_vector() {
    // CONNECT, MQTT 3.1.1, clean session, keep alive 60, client id "c1".
    let bytes = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
    ];
    let Some(Packet::Connect(c)) = dec(&bytes, V5).unwrap() else {
        panic!("not a connect")
    };
    assert_eq!(c.version, V3);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id, "c1");
    let mut out = BytesMut::new();
    encode(&Packet::Connect(c), V3, &mut out).unwrap();
    assert_eq!(&out[..], &bytes[..]);
}

#[test]
fn partial_input_consumes_nothing() {
    let bytes = [0x30, 5, 0, 1, b'a', b'x', b'y'];
    for cut in 0..bytes.len() {
        let mut b = BytesMut::from(&bytes[..cut]);
        assert_eq!(
            decode(&mut b, V3, &Limits::default()),
            Ok(None),
            "cut at {cut}"
        );
        assert_eq!(b.len(), cut);
    }
    assert!(matches!(dec(&bytes, V3), Ok(Some(Packet::Publish(_)))));
}

#[test]
fn connect_errors_carry_conformance_ids() {
    let reserved = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 0];
    let e = dec(&reserved, V3).unwrap_err();
    assert_eq!(e, DecodeError::ConnectReservedFlag);
    assert!(e.to_string().contains("[MQTT-3.1.2-3]"));
    let level3 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 3, 0x02, 0, 60, 0, 0];
    let e = dec(&level3, V3).unwrap_err();
    assert_eq!(e.reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    let name = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'X', 4, 0x02, 0, 60, 0, 0];
    assert_eq!(
        dec(&name, V3).unwrap_err(),
        DecodeError::InvalidProtocolName
    );
    let will_qos_no_will = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x0a, 0, 60, 0, 0];
    assert_eq!(
        dec(&will_qos_no_will, V3).unwrap_err(),
        DecodeError::InvalidWillFlags
    );
    let pw_no_user = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 0, 0, 0,
    ];
    assert_eq!(
        dec(&pw_no_user, V3).unwrap_err(),
        DecodeError::PasswordWithoutUsername
    );
}

#[test]
fn invalid_utf8_and_null_are_malformed() {
    let bad = [0x30, 4, 0, 2, 0xff, 0xfe];
    assert_eq!(dec(&bad, V3).unwrap_err(), DecodeError::InvalidUtf8);
    let nul = [0x30, 4, 0, 2, b'a', 0];
    assert_eq!(dec(&nul, V3).unwrap_err(), DecodeError::NullCharacter);
    assert_eq!(
        DecodeError::InvalidUtf8.reason_code(),
        reason::MALFORMED_PACKET
    );
}

#[test]
fn publish_flags() {
    assert_eq!(
        dec(&[0x36, 5, 0, 1, b'a', 0, 1], V3).unwrap_err(),
        DecodeError::InvalidQoS
    );
    assert_eq!(
        dec(&[0x38, 3, 0, 1, b'a'], V3).unwrap_err(),
        DecodeError::DupOnQoS0
    );
    assert_eq!(
        dec(&[0x32, 5, 0, 1, b'a', 0, 0], V3).unwrap_err(),
        DecodeError::ZeroPacketId
    );
    assert_eq!(
        dec(&[0x30, 3, 0, 1, b'#'], V3).unwrap_err(),
        DecodeError::WildcardInTopicName
    );
    assert!(
        matches!(dec(&[0x34, 5, 0, 1, b'a', 0, 1], V3), Ok(Some(Packet::Publish(p))) if p.qos == QoS::ExactlyOnce)
    );
}

#[test]
fn header_flags_and_types() {
    assert!(matches!(
        dec(&[0x80, 6, 0, 1, 0, 1, b'a', 0], V3),
        Err(DecodeError::InvalidHeaderFlags { .. })
    ));
    assert_eq!(
        dec(&[0x00, 0], V3).unwrap_err(),
        DecodeError::InvalidPacketType(0)
    );
    assert_eq!(
        dec(&[0xF0, 0], V3).unwrap_err(),
        DecodeError::InvalidPacketType(15)
    );
    assert!(matches!(dec(&[0xF0, 0], V5), Ok(Some(Packet::Auth(_)))));
    assert_eq!(
        dec(&[0xC0, 1, 0], V3).unwrap_err(),
        DecodeError::TrailingBytes(1)
    );
    assert_eq!(
        dec(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], V3).unwrap_err(),
        DecodeError::MalformedVarInt
    );
}

#[test]
fn packet_size_limit_at_n_and_n_plus_1() {
    let limits = Limits {
        max_packet_size: 100,
        ..Limits::default()
    };
    // A publish whose whole packet is exactly 100 bytes: 1 + 1 (remaining 98) + 2 + 1 + 95.
    let mut p = Publish::new("a", Bytes::from(vec![7u8; 95]));
    p.qos = QoS::AtMostOnce;
    let mut b = BytesMut::new();
    encode(&Packet::Publish(p.clone()), V3, &mut b).unwrap();
    assert_eq!(b.len(), 100);
    assert!(matches!(decode(&mut b, V3, &limits), Ok(Some(_))));
    p.payload = Bytes::from(vec![7u8; 96]);
    let mut b = BytesMut::new();
    encode(&Packet::Publish(p), V3, &mut b).unwrap();
    assert_eq!(b.len(), 101);
    // Refused from the header alone, before the body is buffered.
    let mut head = BytesMut::from(&b[..2]);
    assert_eq!(
        decode(&mut head, V3, &limits).unwrap_err(),
        DecodeError::PacketTooLarge {
            size: 101,
            max: 100
        }
    );
}

#[test]
fn filter_count_limit_at_n_and_n_plus_1() {
    let limits = Limits {
        max_filters: 8,
        ..Limits::default()
    };
    let sub = |n: usize| {
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: (0..n)
                .map(|i| SubscribeFilter {
                    filter: format!("t/{i}"),
                    options: SubscriptionOptions::default(),
                })
                .collect(),
            properties: Properties::default(),
        })
    };
    let mut b = BytesMut::new();
    encode(&sub(8), V3, &mut b).unwrap();
    assert!(matches!(decode(&mut b, V3, &limits), Ok(Some(_))));
    let mut b = BytesMut::new();
    encode(&sub(9), V3, &mut b).unwrap();
    assert_eq!(
        decode(&mut b, V3, &limits).unwrap_err(),
        DecodeError::TooManyFilters { count: 9, max: 8 }
    );
}

#[test]
fn user_property_limit_at_n_and_n_plus_1() {
    let limits = Limits {
        max_user_properties: 3,
        ..Limits::default()
    };
    let with = |n: usize| {
        let mut p = Publish::new("a/b", "x");
        p.properties.user_properties = (0..n)
            .map(|i| UserProperty {
                key: format!("k{i}").into(),
                value: "v".into(),
            })
            .collect();
        Packet::Publish(p)
    };
    let mut b = BytesMut::new();
    encode(&with(3), V5, &mut b).unwrap();
    assert!(matches!(decode(&mut b, V5, &limits), Ok(Some(_))));
    let mut b = BytesMut::new();
    encode(&with(4), V5, &mut b).unwrap();
    assert_eq!(
        decode(&mut b, V5, &limits).unwrap_err(),
        DecodeError::TooManyUserProperties(3)
    );
}

#[test]
fn properties_checked_per_packet() {
    // PUBLISH v5 with Session Expiry Interval (0x11): not allowed in PUBLISH.
    let bytes = [0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1];
    assert!(matches!(
        dec(&bytes, V5),
        Err(DecodeError::PropertyNotAllowed { id: 0x11, .. })
    ));
    // Duplicate Message Expiry Interval.
    let bytes = [0x30, 14, 0, 1, b'a', 10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2];
    assert_eq!(
        dec(&bytes, V5).unwrap_err(),
        DecodeError::DuplicateProperty(0x02)
    );
    // Unknown property 0x7f.
    let bytes = [0x30, 6, 0, 1, b'a', 2, 0x7f, 0];
    assert_eq!(
        dec(&bytes, V5).unwrap_err(),
        DecodeError::UnknownProperty(0x7f)
    );
    // Topic alias 0 is a protocol error.
    let bytes = [0x30, 7, 0, 1, b'a', 3, 0x23, 0, 0];
    assert_eq!(
        dec(&bytes, V5).unwrap_err(),
        DecodeError::InvalidPropertyValue(0x23)
    );
}

#[test]
fn v5_connect_roundtrip_with_will_and_properties() {
    let mut props = Properties::default();
    props.session_expiry_interval = Some(3600);
    props.receive_maximum = Some(20);
    props.user_properties.push(UserProperty {
        key: "a".into(),
        value: "b".into(),
    });
    let mut wprops = Properties::default();
    wprops.will_delay_interval = Some(5);
    wprops.content_type = Some("text/plain".into());
    let c = Packet::Connect(Box::new(Connect {
        version: V5,
        clean_start: false,
        keep_alive: 30,
        client_id: "dev-1".into(),
        will: Some(Will {
            topic: "will/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: wprops,
        }),
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        properties: props,
    }));
    assert_eq!(roundtrip(&c, V5), c);
}

fn arb_string() -> impl Strategy<Value = String> {
    "[a-z0-9/]{1,20}".prop_filter("no empty", |s| !s.is_empty())
}

fn arb_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of("[a-z]{0,8}"),
        proptest::collection::vec(("[a-z]{0,5}", "[a-z]{0,5}"), 0..4),
    )
        .prop_map(|(exp, ct, ups)| Properties {
            message_expiry_interval: exp,
            content_type: ct.map(Into::into),
            user_properties: ups
                .into_iter()
                .map(|(k, v)| UserProperty {
                    key: k.into(),
                    value: v.into(),
                })
                .collect(),
            ..Properties::default()
        })
}

fn arb_publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        arb_string(),
        proptest::collection::vec(any::<u8>(), 0..200),
        0u8..2,
        any::<bool>(),
        1u16..,
        arb_props(),
    )
        .prop_map(move |(t, payload, q, retain, id, props)| {
            let qos = QoS::from_bits(q).unwrap_or(QoS::AtMostOnce);
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic: t.into(),
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties: if v5 { props } else { Properties::default() },
                payload: payload.into(),
            })
        })
}

proptest! {
    #[test]
    fn publish_roundtrips_v5(p in arb_publish(true)) {
        prop_assert_eq!(roundtrip(&p, V5), p);
    }

    #[test]
    fn publish_roundtrips_v311(p in arb_publish(false)) {
        prop_assert_eq!(roundtrip(&p, V3), p);
    }

    #[test]
    fn subscribe_roundtrips(filters in proptest::collection::vec(("[a-z+/#]{1,12}", 0u8..2, any::<bool>()), 1..8), id in 1u16..) {
        let filters: Vec<_> = filters.into_iter()
            .filter(|(f, _, _)| topic::validate_filter(f).is_ok())
            .map(|(f, q, nl)| SubscribeFilter { filter: f, options: SubscriptionOptions { qos: QoS::from_bits(q).unwrap_or(QoS::AtMostOnce), no_local: nl, ..Default::default() } })
            .collect();
        prop_assume!(!filters.is_empty());
        let p = Packet::Subscribe(Subscribe { packet_id: id, filters, properties: Properties::default() });
        prop_assert_eq!(roundtrip(&p, V5), p);
    }

    /// The borrowed PUBLISH encoder writes exactly the bytes of the owned one.
    #[test]
    fn encode_publish_matches_encode(p in arb_publish(true), v5 in any::<bool>()) {
        let v = if v5 { V5 } else { V3 };
        let Packet::Publish(publish) = &p else { unreachable!() };
        let mut a = BytesMut::new();
        encode(&p, v, &mut a).unwrap();
        let mut b = BytesMut::new();
        encode_publish(&PublishRef::from(publish), v, &mut b).unwrap();
        prop_assert_eq!(a, b);
    }

    /// Total: arbitrary bytes never panic, and never consume more than they hold.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), v5 in any::<bool>()) {
        let mut b = BytesMut::from(&bytes[..]);
        let v = if v5 { V5 } else { V3 };
        let limits = Limits { max_packet_size: 256, ..Limits::default() };
        for _ in 0..10 {
            match decode(&mut b, v, &limits) {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
}
