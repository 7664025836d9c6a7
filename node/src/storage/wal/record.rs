//! Record framing: `[len: u32 LE][crc: u32 LE][kind: u8][body: len bytes]`, where `crc` is
//! CRC-32 (crc32fast) over `kind` followed by `body`, and `len` counts the body only.
//!
//! Bodies (all integers little-endian):
//! - [`KIND_HEADER`]: `magic "CNWL", version: u8, first_index: u64, flags: u8, purged: u64,
//!   prev_last: u64` (flag bit 0: `purged` is set, bit 1: `prev_last` is set). First record of
//!   every segment. It means "entries >= first_index written earlier are gone, entries <=
//!   purged are covered by a snapshot, and the log now ends at prev_last": recovery checks
//!   that the segments before agree (a lost segment is a gap), and a segment stays meaningful
//!   after the segments before it are deleted.
//! - [`KIND_ENTRY`]: `index: u64, payload`.
//! - [`KIND_TRUNCATE`]: `from_index: u64` (entries >= it are removed).
//! - [`KIND_PURGE`]: `upto: u64` (entries <= it are covered by a snapshot).

use std::fmt;

pub const KIND_HEADER: u8 = 1;
pub const KIND_ENTRY: u8 = 2;
pub const KIND_TRUNCATE: u8 = 3;
pub const KIND_PURGE: u8 = 4;

/// Bytes before the body: length, checksum, kind.
pub const FRAME_HEADER: usize = 9;
/// Larger than any body we write: a longer length is damage, not data.
pub const MAX_BODY: u32 = 256 << 20;
/// The largest entry payload accepted.
pub const MAX_PAYLOAD: usize = MAX_BODY as usize - 8;

const MAGIC: [u8; 4] = *b"CNWL";
const VERSION: u8 = 1;
const HEADER_BODY: usize = 4 + 1 + 8 + 1 + 8 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Header { first_index: u64, purged: Option<u64>, prev_last: Option<u64> },
    Entry { index: u64, payload: &'a [u8] },
    Truncate { from: u64 },
    Purge { upto: u64 },
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame header, or the body its length announces, runs past the end of the file.
    Incomplete { needed: u64, available: u64 },
    /// The frame is complete but its checksum does not match.
    Checksum { stored: u32, computed: u32, frame_len: u64 },
    /// The checksum matches (or the length is impossible) but the content is not a record
    /// this version writes.
    Malformed(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Incomplete { needed, available } => {
                write!(f, "record needs {needed} bytes but only {available} remain in the file")
            }
            FrameError::Checksum { stored, computed, .. } => {
                write!(f, "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            FrameError::Malformed(why) => f.write_str(why),
        }
    }
}

fn checksum(kind: u8, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(body);
    hasher.finalize()
}

fn push_frame(out: &mut Vec<u8>, kind: u8, body_parts: &[&[u8]]) {
    let len: usize = body_parts.iter().map(|p| p.len()).sum();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    for part in body_parts {
        hasher.update(part);
    }
    // Callers bound payloads by MAX_PAYLOAD, so the length fits in a u32.
    out.reserve(FRAME_HEADER + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.push(kind);
    for part in body_parts {
        out.extend_from_slice(part);
    }
}

/// Appends the frame of `record` to `out`; returns the frame's length.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) -> usize {
    let before = out.len();
    match *record {
        Record::Header { first_index, purged, prev_last } => {
            let mut body = [0u8; HEADER_BODY];
            body[..4].copy_from_slice(&MAGIC);
            body[4] = VERSION;
            body[5..13].copy_from_slice(&first_index.to_le_bytes());
            body[13] = u8::from(purged.is_some()) | (u8::from(prev_last.is_some()) << 1);
            body[14..22].copy_from_slice(&purged.unwrap_or(0).to_le_bytes());
            body[22..30].copy_from_slice(&prev_last.unwrap_or(0).to_le_bytes());
            push_frame(out, KIND_HEADER, &[&body]);
        }
        Record::Entry { index, payload } => push_frame(out, KIND_ENTRY, &[&index.to_le_bytes(), payload]),
        Record::Truncate { from } => push_frame(out, KIND_TRUNCATE, &[&from.to_le_bytes()]),
        Record::Purge { upto } => push_frame(out, KIND_PURGE, &[&upto.to_le_bytes()]),
    }
    out.len() - before
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Whether a body of `len` bytes is possible for `kind` (checked before the checksum).
fn plausible_len(kind: u8, len: usize) -> bool {
    match kind {
        KIND_HEADER => len == HEADER_BODY,
        KIND_ENTRY => len >= 8,
        KIND_TRUNCATE | KIND_PURGE => len == 8,
        _ => false,
    }
}

/// Parses the frame at the start of `bytes`: the record and the frame's length.
pub fn decode(bytes: &[u8]) -> Result<(Record<'_>, usize), FrameError> {
    let available = bytes.len() as u64;
    let (Some(len), Some(stored)) = (u32_at(bytes, 0), u32_at(bytes, 4)) else {
        return Err(FrameError::Incomplete { needed: FRAME_HEADER as u64, available });
    };
    let Some(&kind) = bytes.get(8) else {
        return Err(FrameError::Incomplete { needed: FRAME_HEADER as u64, available });
    };
    let needed = FRAME_HEADER as u64 + u64::from(len);
    if needed > available {
        return Err(FrameError::Incomplete { needed, available });
    }
    if len > MAX_BODY {
        return Err(FrameError::Malformed(format!("record length {len} is larger than any record written")));
    }
    let end = FRAME_HEADER + len as usize;
    let body = &bytes[FRAME_HEADER..end];
    let computed = checksum(kind, body);
    if computed != stored {
        return Err(FrameError::Checksum { stored, computed, frame_len: needed });
    }
    if !plausible_len(kind, body.len()) {
        return Err(FrameError::Malformed(format!("record of kind {kind} with a body of {len} bytes")));
    }
    let malformed = || FrameError::Malformed(format!("record of kind {kind} is malformed"));
    let record = match kind {
        KIND_HEADER => {
            if body[..4] != MAGIC {
                return Err(FrameError::Malformed("segment header has the wrong magic number".into()));
            }
            if body[4] != VERSION {
                return Err(FrameError::Malformed(format!(
                    "segment format version {} is not supported",
                    body[4]
                )));
            }
            let first_index = u64_at(body, 5).ok_or_else(malformed)?;
            let flags = body[13];
            if flags > 3 {
                return Err(malformed());
            }
            let purged = if flags & 1 != 0 { Some(u64_at(body, 14).ok_or_else(malformed)?) } else { None };
            let prev_last = if flags & 2 != 0 { Some(u64_at(body, 22).ok_or_else(malformed)?) } else { None };
            Record::Header { first_index, purged, prev_last }
        }
        KIND_ENTRY => Record::Entry { index: u64_at(body, 0).ok_or_else(malformed)?, payload: &body[8..] },
        KIND_TRUNCATE => Record::Truncate { from: u64_at(body, 0).ok_or_else(malformed)? },
        KIND_PURGE => Record::Purge { upto: u64_at(body, 0).ok_or_else(malformed)? },
        _ => return Err(malformed()),
    };
    Ok((record, end))
}

/// The first offset after `after` where a complete, valid record starts, if any.
///
/// Used before treating a damaged record at the end of the last segment as a torn write: a
/// valid record after it means the damaged one was acknowledged data (a damaged length can
/// make a record look like it runs past the end of the file), not an interrupted write.
pub fn next_valid_frame(bytes: &[u8], after: usize) -> Option<usize> {
    let last_start = bytes.len().checked_sub(FRAME_HEADER)?;
    (after.saturating_add(1)..=last_start).find(|&at| {
        let rest = &bytes[at..];
        let (Some(len), Some(&kind)) = (u32_at(rest, 0), rest.get(8)) else { return false };
        // Cheap filters first; the checksum decides.
        len <= MAX_BODY
            && plausible_len(kind, len as usize)
            && FRAME_HEADER + len as usize <= rest.len()
            && decode(rest).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Header { first_index: 7, purged: None, prev_last: None },
            Record::Header { first_index: 9, purged: Some(3), prev_last: Some(8) },
            Record::Header { first_index: 9, purged: None, prev_last: Some(2) },
            Record::Entry { index: 42, payload: b"hello" },
            Record::Entry { index: 43, payload: b"" },
            Record::Truncate { from: 5 },
            Record::Purge { upto: 11 },
        ];
        let mut bytes = Vec::new();
        for record in &records {
            encode(record, &mut bytes);
        }
        let mut at = 0;
        for record in &records {
            let (decoded, len) = decode(&bytes[at..]).expect("valid frame");
            assert_eq!(&decoded, record);
            at += len;
        }
        assert_eq!(at, bytes.len());
    }

    #[test]
    fn damage_is_classified() {
        let mut bytes = Vec::new();
        encode(&Record::Entry { index: 1, payload: b"payload" }, &mut bytes);
        assert!(matches!(decode(&bytes[..5]), Err(FrameError::Incomplete { .. })));
        assert!(matches!(decode(&bytes[..bytes.len() - 1]), Err(FrameError::Incomplete { .. })));
        let mut flipped = bytes.clone();
        flipped[12] ^= 1;
        assert!(matches!(decode(&flipped), Err(FrameError::Checksum { .. })));
        assert_eq!(next_valid_frame(&flipped, 0), None);
        let mut two = flipped.clone();
        encode(&Record::Truncate { from: 1 }, &mut two);
        assert_eq!(next_valid_frame(&two, 0), Some(bytes.len()));
    }
}
