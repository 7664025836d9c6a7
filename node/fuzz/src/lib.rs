//! Fuzz harnesses for what a member reads from outside: its write-ahead log on disk
//! (`wal`), client requests as the apply layer sees them (`apply`), snapshot files
//! (`snapshot`) and the HTTP/2 frames its `:authority` rewriter parses (`authority`).
//!
//! Each `check` takes the fuzzer's bytes and panics only when a property the member relies
//! on fails; input that is merely wrong must be refused with an error, never a panic, an
//! unbounded allocation, or a change it should not make. `make fuzz` runs them under
//! libFuzzer (`cargo fuzz`); `tests/corpus.rs` replays the committed corpus and every input
//! that once failed through the same functions on every `cargo test`.

pub mod apply;
pub mod authority;
pub mod snapshot;
pub mod wal;

/// Reads a fuzzer's bytes as a sequence of small fields; past the end every field is empty,
/// so any input decodes to something.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.rest.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.rest = rest;
        first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    /// A field of `[length: u16 LE][bytes]`.
    pub fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.bytes(len)
    }

    pub fn remainder(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// Writes `chunk` as read by `Fields::chunk` (seed corpora are built with it).
pub fn push_chunk(out: &mut Vec<u8>, chunk: &[u8]) {
    let len = u16::try_from(chunk.len()).expect("a seed chunk fits a u16 length");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(chunk);
}

/// A scratch directory on tmpfs where there is one: the harnesses fsync, and a fuzzer runs
/// them thousands of times a second.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    dir.expect("a scratch directory")
}
