//! Line 1 of an image. The original reader only checks that it contains
//! `Hot-Clone`, so metadata appended to it as `key=value` tokens keeps an
//! image restorable by the original tools (revision 1, see FORMAT.md).

use super::error::{FormatErrorKind, quote_line};
use super::record::parse_decimal;
use super::{BANNER_MARK, BANNER_PLAIN, REVISION_MAX};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Facts about the source device, as recorded when the image was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// `size=`: the device's size in bytes; no section may end past it.
    pub device_bytes: Option<u64>,
    /// `lbs=`: the device's logical block size in bytes.
    pub logical_block_bytes: Option<u64>,
    /// `source=`: the device path that was imaged.
    pub source: Option<PathBuf>,
    /// `tool=`: the program and version that wrote the image.
    pub tool: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Banner {
    /// 0 for a banner without an `hc=` token (the original tool's).
    pub revision: u32,
    pub meta: Meta,
}

impl Banner {
    /// The original tool's banner: no metadata, revision 0.
    pub fn plain() -> Self {
        Banner::default()
    }

    /// Parses line 1, newline included.
    pub fn parse(line: &[u8]) -> Result<Banner, FormatErrorKind> {
        let Some(body) = line.strip_suffix(b"\n") else {
            return Err(FormatErrorKind::TruncatedLine(quote_line(line)));
        };
        if !contains(body, BANNER_MARK.as_bytes()) {
            return Err(FormatErrorKind::NotAnImage(quote_line(line)));
        }
        let mut tokens = body
            .split(|&b| b == b' ')
            .skip_while(|t| !t.starts_with(b"hc="));
        let Some(hc) = tokens.next() else {
            return Ok(Banner::plain());
        };
        let malformed = |token: &[u8]| FormatErrorKind::MalformedMeta(quote_line(token));
        let revision = parse_decimal(&hc[3..])
            .and_then(|r| u32::try_from(r).ok())
            .filter(|&r| r >= 1)
            .ok_or_else(|| malformed(hc))?;
        if revision > REVISION_MAX {
            return Err(FormatErrorKind::NewerRevision {
                declared: revision,
                supported: REVISION_MAX,
            });
        }
        let mut meta = Meta::default();
        for token in tokens {
            let eq = token
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| malformed(token))?;
            let (key, value) = (&token[..eq], &token[eq + 1..]);
            let value = unescape(value).ok_or_else(|| malformed(token))?;
            let slot_taken = match key {
                b"size" => meta
                    .device_bytes
                    .replace(parse_decimal(&value).ok_or_else(|| malformed(token))?)
                    .is_some(),
                b"lbs" => meta
                    .logical_block_bytes
                    .replace(parse_decimal(&value).ok_or_else(|| malformed(token))?)
                    .is_some(),
                b"source" => meta
                    .source
                    .replace(PathBuf::from(OsString::from_vec(value)))
                    .is_some(),
                b"tool" => meta
                    .tool
                    .replace(String::from_utf8(value).map_err(|_| malformed(token))?)
                    .is_some(),
                _ => return Err(FormatErrorKind::UnknownMetaKey(quote_line(key))),
            };
            if slot_taken {
                return Err(malformed(token));
            }
        }
        Ok(Banner { revision, meta })
    }

    /// Writes line 1, newline included.
    pub fn encode(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(BANNER_PLAIN.as_bytes())?;
        if self.revision > 0 {
            write!(out, " hc={}", self.revision)?;
            if let Some(bytes) = self.meta.device_bytes {
                write!(out, " size={bytes}")?;
            }
            if let Some(bytes) = self.meta.logical_block_bytes {
                write!(out, " lbs={bytes}")?;
            }
            if let Some(path) = &self.meta.source {
                out.write_all(b" source=")?;
                escape(out, path.as_os_str().as_bytes())?;
            }
            if let Some(tool) = &self.meta.tool {
                out.write_all(b" tool=")?;
                escape(out, tool.as_bytes())?;
            }
        } else {
            debug_assert_eq!(self.meta, Meta::default(), "metadata needs revision >= 1");
        }
        out.write_all(b"\n")
    }
}

/// Metadata from an image, safe to print on a terminal: printable ASCII as
/// it is, a backslash as `\\`, every other byte (control characters, the
/// ESC of a terminal escape sequence, bytes of non-ASCII characters, which
/// could be bidirectional overrides) as `\xNN`. The banner is input, and
/// a hostile image must not be able to drive the operator's terminal.
pub fn printable(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        match b {
            b'\\' => out.push_str("\\\\"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

impl Meta {
    /// `source=` as [`printable`] shows it.
    pub fn source_printable(&self) -> Option<String> {
        self.source
            .as_ref()
            .map(|path| printable(path.as_os_str().as_bytes()))
    }

    /// `tool=` as [`printable`] shows it.
    pub fn tool_printable(&self) -> Option<String> {
        self.tool.as_ref().map(|tool| printable(tool.as_bytes()))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Values are percent-encoded: every byte outside printable ASCII, and
/// `%`, `=` and space, become `%XX`.
fn escape(out: &mut impl Write, value: &[u8]) -> io::Result<()> {
    for &b in value {
        if b.is_ascii_graphic() && b != b'%' && b != b'=' {
            out.write_all(&[b])?;
        } else {
            write!(out, "%{b:02X}")?;
        }
    }
    Ok(())
}

fn unescape(value: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b.is_ascii_graphic() && b != b'=' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(banner: &Banner) -> Vec<u8> {
        let mut line = Vec::new();
        banner.encode(&mut line).unwrap();
        line
    }

    #[test]
    fn plain_banner_is_the_originals() {
        assert_eq!(
            encoded(&Banner::plain()),
            b"This-Is-A-Hot-Clone-Image See: https://github.com/benjojo/hot-clone\n"
        );
        assert_eq!(
            Banner::parse(&encoded(&Banner::plain())).unwrap(),
            Banner::plain()
        );
    }

    #[test]
    fn metadata_round_trips_with_awkward_paths() {
        let banner = Banner {
            revision: 1,
            meta: Meta {
                device_bytes: Some(1 << 40),
                logical_block_bytes: Some(4096),
                source: Some(PathBuf::from(OsString::from_vec(
                    b"/dev/disk/by-id/a b%c=d\xff\n".to_vec(),
                ))),
                tool: Some("hot-clone/0.1.0".into()),
            },
        };
        let line = encoded(&banner);
        assert!(line.starts_with(BANNER_PLAIN.as_bytes()));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(Banner::parse(&line).unwrap(), banner);
    }

    #[test]
    fn printed_metadata_cannot_drive_a_terminal() {
        let line = format!(
            "{BANNER_PLAIN} hc=1 source=/dev/x%1B]0;owned%07%0A%E2%80%AE tool=a%5Cb%1B[2J\n"
        );
        let banner = Banner::parse(line.as_bytes()).unwrap();
        let source = banner.meta.source_printable().unwrap();
        let tool = banner.meta.tool_printable().unwrap();
        assert_eq!(source, "/dev/x\\x1b]0;owned\\x07\\x0a\\xe2\\x80\\xae");
        assert_eq!(tool, "a\\\\b\\x1b[2J");
        for shown in [source, tool] {
            assert!(
                shown.bytes().all(|b| (b' '..=b'~').contains(&b)),
                "{shown:?}"
            );
        }
        assert_eq!(
            printable(b"/dev/disk/by-id/usb-X_1"),
            "/dev/disk/by-id/usb-X_1"
        );
    }

    #[test]
    fn any_line_with_the_mark_is_a_plain_banner() {
        assert_eq!(
            Banner::parse(b"xx Hot-Clone yy\n").unwrap(),
            Banner::plain()
        );
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        let base = BANNER_PLAIN;
        type Expect = fn(&FormatErrorKind) -> bool;
        let cases: [(String, Expect); 7] = [
            ("not an image\n".into(), |k| {
                matches!(k, FormatErrorKind::NotAnImage(_))
            }),
            (format!("{base} hc=3\n"), |k| {
                matches!(k, FormatErrorKind::NewerRevision { declared: 3, .. })
            }),
            (format!("{base} hc=1 colour=blue\n"), |k| {
                matches!(k, FormatErrorKind::UnknownMetaKey(_))
            }),
            (format!("{base} hc=0\n"), |k| {
                matches!(k, FormatErrorKind::MalformedMeta(_))
            }),
            (format!("{base} hc=1 size=x\n"), |k| {
                matches!(k, FormatErrorKind::MalformedMeta(_))
            }),
            (format!("{base} hc=1 size=1 size=2\n"), |k| {
                matches!(k, FormatErrorKind::MalformedMeta(_))
            }),
            (format!("{base} hc=1 source=%zz\n"), |k| {
                matches!(k, FormatErrorKind::MalformedMeta(_))
            }),
        ];
        for (line, expected) in cases {
            let err = Banner::parse(line.as_bytes()).unwrap_err();
            assert!(expected(&err), "{line:?} gave {err}");
        }
        assert!(matches!(
            Banner::parse(base.as_bytes()),
            Err(FormatErrorKind::TruncatedLine(_))
        ));
    }
}
