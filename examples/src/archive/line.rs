//! One record, one line of an archived object.
//!
//! A record whose data is UTF-8 text without a line break inside is stored as that text (a
//! trailing `\n` or `\r\n` is taken off: log shippers send lines with or without one). Any
//! other record (binary data, text with line breaks inside, or text that itself starts with
//! the marker) is stored as [`BASE64_MARKER`] followed by its data in standard base64, so every
//! record is exactly one line and none is ever dropped.

use base64::Engine;

/// Starts the line of a record stored base64-encoded.
pub const BASE64_MARKER: &str = "#kcl-base64:";

/// The line (without its `\n`) that stores a record's data.
pub fn encode_line(data: &[u8]) -> String {
    let trimmed = data
        .strip_suffix(b"\r\n")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    match std::str::from_utf8(trimmed) {
        Ok(text) if !text.contains(['\n', '\r']) && !text.starts_with(BASE64_MARKER) => {
            text.to_owned()
        }
        _ => format!(
            "{BASE64_MARKER}{}",
            base64::engine::general_purpose::STANDARD.encode(data)
        ),
    }
}

/// The data a line stores: the line's text, or the decoded base64 after the marker. (The
/// trailing line break [`encode_line`] takes off plain text is not restored.)
pub fn decode_line(line: &str) -> Result<Vec<u8>, base64::DecodeError> {
    match line.strip_prefix(BASE64_MARKER) {
        Some(encoded) => base64::engine::general_purpose::STANDARD.decode(encoded),
        None => Ok(line.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_is_stored_as_itself_without_its_line_break() {
        assert_eq!(encode_line(b"GET / 200"), "GET / 200");
        assert_eq!(encode_line(b"GET / 200\n"), "GET / 200");
        assert_eq!(encode_line(b"GET / 200\r\n"), "GET / 200");
        assert_eq!(encode_line("héllo".as_bytes()), "héllo");
        assert_eq!(encode_line(b""), "");
    }

    #[test]
    fn anything_else_is_base64_behind_the_marker() {
        assert_eq!(encode_line(&[0xff, 0x00, 0xfe]), "#kcl-base64:/wD+");
        // Two lines in one record stay one line of the archive.
        assert_eq!(encode_line(b"a\nb"), "#kcl-base64:YQpi");
        // Text that looks like the marker is not mistaken for it.
        let tricky = encode_line(b"#kcl-base64:AAAA");
        assert_eq!(decode_line(&tricky).unwrap(), b"#kcl-base64:AAAA");
    }

    proptest! {
        #[test]
        fn every_record_is_one_line_that_decodes_back(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let line = encode_line(&data);
            prop_assert!(!line.contains('\n'));
            let decoded = decode_line(&line).unwrap();
            let stripped = data
                .strip_suffix(b"\r\n")
                .or_else(|| data.strip_suffix(b"\n"))
                .unwrap_or(&data);
            if line.starts_with(BASE64_MARKER) {
                prop_assert_eq!(decoded, data);
            } else {
                prop_assert_eq!(decoded, stripped.to_vec());
            }
        }
    }
}
