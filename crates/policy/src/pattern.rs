//! Wildcard patterns of the policy language: `*` matches any run of characters (across `/` and
//! `:`), `?` exactly one character. MQTT `+` and `#` are ordinary characters here.

/// One element of a compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// A literal character.
    Char(char),
    /// `*`.
    Star,
    /// `?`.
    One,
}

/// A compiled pattern, specialised so that the common shapes cost one comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Matches nothing: an element whose policy variable could not be resolved (AWS: an
    /// unresolved variable results in access denied; it never matches its own text).
    Never,
    /// `*`: matches everything.
    Any,
    /// No wildcard: equality.
    Exact(Box<str>),
    /// `prefix*` with no other wildcard.
    Prefix(Box<str>),
    /// Anything else.
    Glob(Box<[Tok]>),
}

impl Pattern {
    /// Builds a pattern from tokens.
    pub(crate) fn from_toks(toks: Vec<Tok>, lowercase: bool) -> Pattern {
        let toks: Vec<Tok> = if lowercase {
            toks.into_iter()
                .map(|t| match t {
                    Tok::Char(c) => Tok::Char(c.to_ascii_lowercase()),
                    t => t,
                })
                .collect()
        } else {
            toks
        };
        let stars = toks.iter().filter(|t| **t == Tok::Star).count();
        let ones = toks.iter().filter(|t| **t == Tok::One).count();
        let lit = |ts: &[Tok]| -> String {
            ts.iter()
                .map(|t| match t {
                    Tok::Char(c) => *c,
                    _ => '\0',
                })
                .collect()
        };
        match (stars, ones) {
            (0, 0) => Pattern::Exact(lit(&toks).into()),
            (1, 0) if toks.len() == 1 => Pattern::Any,
            (1, 0) if toks.last() == Some(&Tok::Star) => {
                Pattern::Prefix(lit(&toks[..toks.len() - 1]).into())
            }
            _ => Pattern::Glob(toks.into()),
        }
    }

    /// A pattern from a plain string where `*` and `?` are wildcards.
    pub fn new(s: &str) -> Pattern {
        Pattern::from_toks(
            s.chars()
                .map(|c| match c {
                    '*' => Tok::Star,
                    '?' => Tok::One,
                    c => Tok::Char(c),
                })
                .collect(),
            false,
        )
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Never => false,
            Pattern::Any => true,
            Pattern::Exact(e) => **e == *s,
            Pattern::Prefix(p) => s.starts_with(&**p),
            Pattern::Glob(toks) => glob(toks, s),
        }
    }
}

/// Iterative wildcard match with single-star backtracking: O(len(p) * len(s)) worst case,
/// no recursion, no allocation.
fn glob(p: &[Tok], text: &str) -> bool {
    let s: &[u8] = text.as_bytes();
    // The char at byte `i` (always a boundary here) in O(1): no re-validation of the rest,
    // which made every step linear and the match quadratic in the input.
    let next_char = |i: usize| -> Option<(char, usize)> {
        let c = text.get(i..)?.chars().next()?;
        Some((c, i + c.len_utf8()))
    };
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if si < s.len() {
            if pi < p.len() {
                match p[pi] {
                    Tok::Star => {
                        star = Some((pi, si));
                        pi += 1;
                        continue;
                    }
                    Tok::One => {
                        if let Some((_, n)) = next_char(si) {
                            pi += 1;
                            si = n;
                            continue;
                        }
                    }
                    Tok::Char(c) => {
                        if let Some((sc, n)) = next_char(si)
                            && sc == c
                        {
                            pi += 1;
                            si = n;
                            continue;
                        }
                    }
                }
            }
            match star {
                Some((sp, ss)) => {
                    let Some((_, n)) = next_char(ss) else {
                        return false;
                    };
                    star = Some((sp, n));
                    pi = sp + 1;
                    si = n;
                }
                None => return false,
            }
        } else {
            return p[pi..].iter().all(|t| *t == Tok::Star);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(Pattern::new("*"), Pattern::Any);
        assert!(matches!(Pattern::new("a/b"), Pattern::Exact(_)));
        assert!(matches!(Pattern::new("a/*"), Pattern::Prefix(_)));
        assert!(matches!(Pattern::new("a/*/c"), Pattern::Glob(_)));
    }

    #[test]
    fn wildcards_cross_slashes() {
        let p = Pattern::new("arn:aws:iot:*:topic/a/*/c");
        assert!(p.matches("arn:aws:iot:us-east-1:1:topic/a/x/y/c"));
        assert!(!p.matches("arn:aws:iot:us-east-1:1:topic/a/x/y/d"));
        assert!(Pattern::new("a?c").matches("abc"));
        assert!(Pattern::new("a?c").matches("aéc"));
        assert!(!Pattern::new("a?c").matches("ac"));
        assert!(Pattern::new("a*").matches("a"));
        assert!(Pattern::new("*a*b*").matches("xxaxxbxx"));
        assert!(!Pattern::new("*a*b*").matches("xxbxxaxx"));
        assert!(Pattern::new("a/+/#").matches("a/+/#"));
        assert!(!Pattern::new("a/+/#").matches("a/b/c"));
    }
}
