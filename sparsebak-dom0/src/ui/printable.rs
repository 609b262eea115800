//! Text from outside dom0's trust (the receiver's errors and stderr, values
//! echoed from the config file) made safe to show: one line, no control
//! characters, bounded. A newline could forge a second `sparsebak: ...`
//! line, an escape sequence could clear the screen or retitle the window,
//! and a megabyte of text would bury everything else on the terminal and in
//! syslog.

/// The most of one message that is shown, in bytes of escaped text.
pub const MAX_SHOWN: usize = 1024;

/// `text` on one line: control characters, and the invisible ones that
/// reorder or hide text (bidi overrides, zero-width), escaped as `\n`,
/// `\x1b`, `\u{202e}`; at most [`MAX_SHOWN`] bytes, then how much was cut.
pub fn printable(text: &str) -> String {
    printable_within(text, MAX_SHOWN)
}

/// [`printable`] with another bound (a whole log line, which may quote
/// several messages).
pub fn printable_within(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (at, c) in text.char_indices() {
        let before = out.len();
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if sparsebak_proto::names::is_hidden_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
        if out.len() > max {
            out.truncate(before);
            out.push_str(&cut_note(text.len() - at));
            break;
        }
    }
    out
}

/// What ends a message cut `more` bytes short.
pub fn cut_note(more: usize) -> String {
    format!("... ({more} more bytes)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(printable("volume work: 3 chunks, ü"), "volume work: 3 chunks, ü");
    }

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(printable("a\nsparsebak: error: forged"), "a\\nsparsebak: error: forged");
        assert_eq!(printable("\x1b[2J\x07\r\x7f"), "\\x1b[2J\\x07\\r\\x7f");
        assert_eq!(printable("\u{9b}x\u{202e}y"), "\\x9bx\\u{202e}y");
    }

    #[test]
    fn long_text_is_cut_with_a_count() {
        let shown = printable(&"é".repeat(10_000));
        assert!(shown.len() <= MAX_SHOWN + 40, "{}", shown.len());
        assert!(shown.ends_with(&format!("... ({} more bytes)", 20_000 - 1024)), "{shown}");
        let shown = printable(&"\x01".repeat(5000));
        assert!(shown.starts_with("\\x01\\x01") && shown.ends_with("more bytes)"));
        assert!(shown.len() <= MAX_SHOWN + 40);
    }
}
