//! Arbitrary bytes through the decoder in both versions: never a panic, never more consumed than
//! given; whatever decodes re-encodes and decodes to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sekisho_mqtt::{Limits, ProtocolVersion, decode, encode};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_packet_size: 64 * 1024, ..Limits::default() };
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(p)) = decode(&mut buf, v, &limits) {
            let mut out = BytesMut::new();
            let ver = match &p {
                sekisho_mqtt::Packet::Connect(c) => c.version,
                _ => v,
            };
            if encode(&p, ver, &mut out).is_ok() {
                let again = decode(&mut out, ver, &Limits { max_packet_size: usize::MAX, ..limits });
                assert_eq!(again.ok().flatten().as_ref(), Some(&p));
            }
        }
    }
});
