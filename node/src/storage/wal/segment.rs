//! Segment files: naming, listing, creation, and scanning one file for records with the
//! torn-tail rule applied.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::WalError;
use super::record::{self, FrameError, Record};

/// A segment is named by the first index it may contain: 16 lowercase hex digits + `.wal`.
pub fn file_name(first_index: u64) -> String {
    format!("{first_index:016x}.wal")
}

fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A segment on disk: the first index it may contain (its name) and its path.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub first: u64,
    pub path: PathBuf,
}

pub fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_owned(), source }
}

/// The segments in `dir`, oldest (lowest first index) first. A `.wal` file whose name is
/// not a segment name is refused rather than ignored: it may hold acknowledged entries.
pub fn list(dir: &Path) -> Result<Vec<SegmentFile>, WalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = entry.map_err(io_at(dir))?.path();
        if path.extension().is_none_or(|e| e != "wal") {
            continue;
        }
        match path.file_name().and_then(|n| n.to_str()).and_then(parse_name) {
            Some(first) => segments.push(SegmentFile { first, path }),
            None => {
                return Err(WalError::Corrupt {
                    file: path,
                    offset: 0,
                    reason: "not a segment name this version writes (16 lowercase hex digits + .wal)".into(),
                });
            }
        }
    }
    segments.sort_by_key(|s| s.first);
    Ok(segments)
}

/// An open segment file, shared by the writer and by the entries read back from it. On
/// Linux an open file stays readable after it is deleted, so a purge or truncation that
/// removes a segment cannot fail a read already under way.
#[derive(Debug)]
pub struct OpenSegment {
    pub path: PathBuf,
    pub file: File,
}

/// Makes creations, renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates an empty segment, open for appending and reading, and makes its directory
/// entry durable.
pub fn create(dir: &Path, first: u64) -> io::Result<(SegmentFile, Arc<OpenSegment>)> {
    let path = dir.join(file_name(first));
    let file = OpenOptions::new().read(true).append(true).create_new(true).open(&path)?;
    sync_dir(dir)?;
    Ok((SegmentFile { first, path: path.clone() }, Arc::new(OpenSegment { path, file })))
}

/// Visits the records of one segment's bytes in order, with their offsets and lengths.
///
/// Returns `Ok(None)` when every byte belongs to a valid record, `Ok(Some(offset))` when
/// the segment is the last one and ends in a torn write starting at `offset` (the caller
/// truncates it away), and `Err(Corrupt)` for damage anywhere else. A torn write is: a
/// record running past the end of the file, a final record whose checksum fails with no
/// byte after it, or a zero-filled tail — in each case only when no valid record follows,
/// since a valid record after the damage proves the damaged one had been acknowledged.
pub fn scan(
    path: &Path,
    bytes: &[u8],
    is_last: bool,
    mut visit: impl FnMut(u64, usize, Record<'_>) -> Result<(), WalError>,
) -> Result<Option<u64>, WalError> {
    let mut offset = 0usize;
    while offset < bytes.len() {
        match record::decode(&bytes[offset..]) {
            Ok((record, len)) => {
                visit(offset as u64, len, record)?;
                offset += len;
            }
            Err(error) => {
                let rest = &bytes[offset..];
                let follows = record::next_valid_frame(bytes, offset);
                let torn_shape = match &error {
                    FrameError::Incomplete { .. } => true,
                    // The frame is complete: torn only if it is the very last thing.
                    FrameError::Checksum { frame_len, .. } => *frame_len == rest.len() as u64,
                    FrameError::Malformed(_) => false,
                };
                let zero_tail = rest.iter().all(|&b| b == 0);
                if is_last && (zero_tail || (torn_shape && follows.is_none())) {
                    return Ok(Some(offset as u64));
                }
                let mut reason = error.to_string();
                if let Some(next) = follows {
                    reason.push_str(&format!(
                        "; a valid record follows at offset {next}, so this is damage, not an interrupted write"
                    ));
                } else if !is_last {
                    reason.push_str("; this is not the last segment, so the record was acknowledged");
                }
                return Err(WalError::Corrupt { file: path.to_owned(), offset: offset as u64, reason });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_first_index() {
        assert_eq!(file_name(1), "0000000000000001.wal");
        assert_eq!(parse_name(&file_name(0xdead_beef)), Some(0xdead_beef));
        assert_eq!(parse_name("00000000000000001.wal"), None);
        assert_eq!(parse_name("000000000000000A.wal"), None);
        assert_eq!(parse_name("0000000000000001.tmp"), None);
    }
}
