//! S3's XML: a small element tree for the request bodies S3 reads (CompleteMultipartUpload,
//! Delete, CreateBucketConfiguration), and the writers for its responses.

use quick_xml::events::Event;

/// S3's namespace.
pub const NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";
/// Most elements in a request body (Delete: 1,000 objects; Complete: 10,000 parts).
pub const MAX_NODES: usize = 50_000;
const MAX_DEPTH: usize = 8;

/// An element: its local name, text and children.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Node {
    /// Local name (namespace prefix dropped).
    pub name: String,
    /// Text content, entities resolved.
    pub text: String,
    /// Child elements.
    pub children: Vec<Node>,
}

impl Node {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The children named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child named `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

/// Why a request body is not a document S3 reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlError {
    /// Not well-formed XML (the parser's reason).
    Syntax(String),
    /// A second root element.
    SecondRoot,
    /// More than [`MAX_NODES`] elements or nesting deeper than the bodies S3 reads.
    TooLarge,
    /// An entity other than XML's five.
    UnknownEntity,
    /// A document type declaration (refused: no entity expansion).
    Dtd,
    /// The document ended inside an element, or an end tag closed nothing.
    Unbalanced,
    /// No element at all.
    Empty,
}

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XmlError::Syntax(why) => write!(f, "not well-formed: {why}"),
            XmlError::SecondRoot => f.write_str("more than one root element"),
            XmlError::TooLarge => f.write_str("the document is too large or too deep"),
            XmlError::UnknownEntity => f.write_str("unknown entity"),
            XmlError::Dtd => f.write_str("DTDs are not accepted"),
            XmlError::Unbalanced => f.write_str("unbalanced elements"),
            XmlError::Empty => f.write_str("the document is empty"),
        }
    }
}

impl std::error::Error for XmlError {}

/// Parses a document into its root element. Refuses DTDs, deep nesting and huge documents.
pub fn parse(body: &[u8]) -> Result<Node, XmlError> {
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut stack: Vec<Node> = Vec::new();
    let mut nodes = 0usize;
    let mut root = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| XmlError::Syntax(e.to_string()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if root.is_some() {
                    return Err(XmlError::SecondRoot);
                }
                nodes += 1;
                if nodes > MAX_NODES || stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooLarge);
                }
                let node = Node {
                    name: e.local_name().as_ref().to_owned(),
                    ..Node::default()
                };
                if matches!(ev, Event::Empty(_)) {
                    attach(&mut stack, &mut root, node);
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or(XmlError::Unbalanced)?;
                attach(&mut stack, &mut root, node);
            }
            Event::Text(t) => {
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&t);
                }
            }
            Event::CData(t) => {
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&t);
                }
            }
            Event::GeneralRef(r) => {
                let c = match r
                    .resolve_char_ref()
                    .map_err(|e| XmlError::Syntax(e.to_string()))?
                {
                    Some(c) => c,
                    None => match &*r {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        _ => return Err(XmlError::UnknownEntity),
                    },
                };
                if let Some(n) = stack.last_mut() {
                    n.text.push(c);
                }
            }
            Event::DocType(_) => return Err(XmlError::Dtd),
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Unbalanced);
    }
    root.ok_or(XmlError::Empty)
}

fn attach(stack: &mut [Node], root: &mut Option<Node>, node: Node) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => *root = Some(node),
    }
}

/// Escapes text for an XML element.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `<name>escaped text</name>`.
pub fn el(name: &str, text: &str) -> String {
    format!("<{name}>{}</{name}>", esc(text))
}

/// S3's timestamp: ISO 8601 with milliseconds.
pub fn time(epoch: f64) -> String {
    let ms = (epoch * 1000.0) as i128;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// HTTP's date (`Last-Modified`): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(epoch: f64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(epoch as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[t.weekday().number_days_from_monday() as usize],
        t.day(),
        MONTHS[t.month() as usize - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_botocore_sends() {
        let doc = br#"<?xml version="1.0" encoding="UTF-8"?>
<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>a&amp;b &lt;c&gt; &#x41;</Key></Object><Object><Key>x</Key><VersionId/></Object><Quiet>true</Quiet></Delete>"#;
        let n = parse(doc).unwrap();
        assert_eq!(n.name, "Delete");
        let keys: Vec<_> = n.all("Object").filter_map(|o| o.text_of("Key")).collect();
        assert_eq!(keys, ["a&b <c> A", "x"]);
        assert_eq!(n.text_of("Quiet"), Some("true"));
        assert_eq!(n.all("Object").nth(1).unwrap().children.len(), 2);
    }

    #[test]
    fn refuses_bad_documents() {
        assert!(parse(b"").is_err());
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<!DOCTYPE x [<!ENTITY e \"boom\">]><a>&e;</a>").is_err());
        assert!(parse(b"<a>&e;</a>").is_err());
        let deep = "<a>".repeat(20) + &"</a>".repeat(20);
        assert!(parse(deep.as_bytes()).is_err());
        let many = format!("<a>{}</a>", "<b/>".repeat(MAX_NODES + 1));
        assert!(parse(many.as_bytes()).is_err());
        assert!(parse(b"<a/><b/>").is_err());
    }

    proptest::proptest! {
        /// Arbitrary documents never panic.
        #[test]
        fn arbitrary_documents(doc in "(<[a-zA-Z]{1,3}>|</[a-zA-Z]{1,3}>|<[a-z]/>|&[a-z#0-9x]{0,6};|[a-z ]{0,4}|<!DOCTYPE x>|<\\?xml version=\"1.0\"\\?>){0,40}") {
            let _ = parse(doc.as_bytes());
        }
    }

    #[test]
    fn times() {
        assert_eq!(time(784_111_777.5), "1994-11-06T08:49:37.500Z");
        assert_eq!(http_date(784_111_777.0), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
