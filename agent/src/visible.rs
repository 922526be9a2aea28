//! Text that came from outside the daemon (process names, cgroup paths,
//! unit names) on a terminal or in a diagram: control characters are
//! written out as `\u{1b}`, so that none can move the cursor, recolour the
//! screen, start a line of its own or reorder what follows (the bidi
//! controls). Used by the `flows` table, `status`, `blast-radius` and the
//! graph's DOT and Mermaid output (the HTML page does the same in its
//! script: graph/page.html, `esc`).

use std::{borrow::Cow, fmt::Write as _};

/// `s` with every control character written out.
#[must_use]
pub fn visible(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// C0, DEL and C1 controls, and the bidi embeddings, overrides and
/// isolates (U+200E/F, U+202A-202E, U+2066-2069).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_written_out_and_the_rest_kept() {
        assert!(matches!(visible("nginx: worker ✓"), Cow::Borrowed(_)));
        assert_eq!(visible("a\x1b[2Kb"), "a\\u{1b}[2Kb");
        assert_eq!(visible("x\ny\rz\t"), "x\\u{a}y\\u{d}z\\u{9}");
        assert_eq!(visible("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
        assert_eq!(visible("ab\u{202e}cd"), "ab\\u{202e}cd");
    }
}
