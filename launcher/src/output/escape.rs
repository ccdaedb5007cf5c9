//! Text a job controls (its name, argv, process names), made safe to print on a terminal: a job must not be able
//! to move the cursor, clear the screen, retitle the window or hide text from whoever reads `vrun list`.

/// `s` with control characters (C0, DEL, C1), bidirectional overrides and backslashes escaped (`\n`, `\t`,
/// `\\`, `\x1b`, `\u{202e}`); everything else as it is.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 && c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// `escape` for bytes that may not be UTF-8: each invalid byte as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("python3 job.py --n 3"), "python3 job.py --n 3");
        assert_eq!(escape("ünïcode ok"), "ünïcode ok");
        assert_eq!(escape("a\nb\tc\r"), "a\\nb\\tc\\r");
        assert_eq!(escape("\u{1b}[2J\u{7}"), "\\x1b[2J\\x07");
        assert_eq!(escape("\u{7f}\u{9b}"), "\\x7f\\u{9b}");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        // A backslash is escaped too, so the output reads back one way only.
        assert_eq!(escape("a\\x1b"), "a\\\\x1b");
        assert_eq!(escape_bytes(b"ok\xff\xfe\x1b"), "ok\\xff\\xfe\\x1b");
        for s in ["\u{1b}]0;title\u{7}", "\u{0}\u{1f}\u{85}"] {
            assert!(!escape(s).chars().any(|c| c.is_control()), "{s:?}");
        }
    }

    proptest::proptest! {
        /// Escaped text has no control character left, text without control characters or backslashes is
        /// unchanged, and no two texts escape alike (what is printed reads back one way only).
        #[test]
        fn escaping_is_printable_and_faithful(a in "\\PC*|[\\x00-\\x7f]{0,40}", b in "[\\x00-\\x7f]{0,40}") {
            let (ea, eb) = (escape(&a), escape(&b));
            proptest::prop_assert!(!ea.chars().any(char::is_control));
            if !a.chars().any(|c| c.is_control() || c == '\\' || ('\u{200e}'..='\u{2069}').contains(&c)) {
                proptest::prop_assert_eq!(&ea, &a);
            }
            if a != b {
                proptest::prop_assert_ne!(ea, eb);
            }
        }
    }
}
