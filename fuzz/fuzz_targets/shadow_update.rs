//! Arbitrary requests through the shadow document core, on no shadow and on a stored one, and
//! arbitrary topics through its topic parser: never a panic, and an accepted update's stored
//! form reads back as the same shadow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_shadow::{Shadow, delete, get, parse_topic, update};

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = std::str::from_utf8(data) {
        let _ = parse_topic(t);
    }
    let base = update(
        None,
        br#"{"state":{"desired":{"a":{"b":[1,2]},"c":"x"},"reported":{"a":{"b":[1]}}}}"#,
        1,
    )
    .map(|u| u.shadow)
    .ok();
    for cur in [None, base.as_ref()] {
        let _ = get(cur, "t", data, 2);
        let _ = delete(cur, "t", data, 2);
        if let Ok(u) = update(cur, data, 2) {
            assert_eq!(Shadow::from_json(&u.shadow.to_json()).as_ref(), Some(&u.shadow));
            let _ = get(Some(&u.shadow), "t", b"", 3);
        }
    }
});
