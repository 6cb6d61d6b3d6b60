//! S3 request bodies through `s3::xml::parse` (CompleteMultipartUpload, Delete,
//! CreateBucketConfiguration): never a panic; what parses is within the reader's bounds (depth,
//! element count) and is read the way the handlers read it. And text written with `esc`, as
//! S3's responses write keys, reads back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_s3::xml::{MAX_NODES, NS, Node, el, esc, parse};

/// The reader refuses anything nested deeper than this.
const MAX_DEPTH: usize = 8;

fn walk(n: &Node, depth: usize, count: &mut usize) {
    assert!(depth <= MAX_DEPTH, "nested {depth} deep");
    *count += 1;
    for c in &n.children {
        walk(c, depth + 1, count);
    }
}

/// What the handlers take out of a document (bucket.rs, multipart.rs, object.rs).
fn read_like_handlers(doc: &Node) {
    let _ = doc.text_of("LocationConstraint").map(str::trim);
    for p in doc.all("Part") {
        let _ = p
            .text_of("PartNumber")
            .and_then(|n| n.trim().parse::<u32>().ok());
        let _ = p.text_of("ETag").map(|e| e.trim().trim_matches('"'));
    }
    let keys: Vec<&str> = doc.all("Object").filter_map(|o| o.text_of("Key")).collect();
    let _ = keys.len();
    let _ = doc.text_of("Quiet").is_some_and(|q| q.trim() == "true");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = parse(data) {
        let mut count = 0;
        walk(&doc, 1, &mut count);
        assert!(count <= MAX_NODES, "{count} elements");
        read_like_handlers(&doc);
    }

    // Round trip: an escaped key in a Delete document reads back unchanged. XML has no way
    // to carry most control characters, and a conforming reader folds CR LF into LF, so those
    // are left out.
    if let Ok(s) = std::str::from_utf8(data)
        && s.chars().all(|c| c == '\t' || c == '\n' || !c.is_control())
    {
        let doc = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Delete xmlns=\"{NS}\"><Object>{}</Object><Quiet>true</Quiet></Delete>",
            el("Key", s)
        );
        let n = parse(doc.as_bytes()).unwrap_or_else(|e| panic!("{e}: {doc:?}"));
        let keys: Vec<&str> = n.all("Object").filter_map(|o| o.text_of("Key")).collect();
        assert_eq!(keys, [s], "{doc:?}");
        // And as a root element's text.
        let again = parse(format!("<a>{}</a>", esc(s)).as_bytes()).expect("escaped text");
        assert_eq!(again.text, s);
    }
});
