//! Arbitrary documents through the policy parser, binder and evaluator: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_policy::{Dialect, MapContext, Policy, decide, explain};

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = std::str::from_utf8(data) else { return };
    for d in [Dialect::Iot, Dialect::IamIdentity, Dialect::IamTrust] {
        if let Ok(p) = Policy::parse(doc, d) {
            let mut ctx = MapContext::new();
            ctx.set("iot:ClientId", "c").set("aws:SourceIp", "10.0.0.1");
            let b = p.bind(&ctx);
            let _ = decide([&b], "iot:publish", "arn:aws:iot:us-east-1:1:topic/a/b", &ctx);
            let _ = explain([&b], "iot:connect", "arn:aws:iot:us-east-1:1:client/c", &ctx);
        }
    }
});
