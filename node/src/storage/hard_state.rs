//! A small file replaced atomically and durably: write a temporary file, fsync it, rename
//! it over the old one, fsync the directory. A crash leaves the old or the new contents,
//! never a mix. A checksum catches a file damaged at rest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct HardStateFile {
    path: PathBuf,
}

impl HardStateFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The stored bytes, or `None` when the file was never written.
    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let corrupt = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is corrupt (checksum mismatch); restore the data directory or replace the member",
                    self.path.display()
                ),
            )
        };
        if bytes.len() < 4 {
            return Err(corrupt());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != sum {
            return Err(corrupt());
        }
        Ok(Some(body.to_vec()))
    }

    pub fn save(&self, body: &[u8]) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(body)?;
        file.write_all(&crc32fast::hash(body).to_le_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
    }
}

/// Makes a rename or a file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_replaces_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = HardStateFile::new(dir.path().join("state"));
        assert_eq!(file.load().expect("load"), None);
        file.save(b"vote 1").expect("save");
        file.save(b"vote 2").expect("save");
        assert_eq!(file.load().expect("load"), Some(b"vote 2".to_vec()));
        let mut bytes = fs::read(dir.path().join("state")).expect("read");
        bytes[0] ^= 1;
        fs::write(dir.path().join("state"), bytes).expect("write");
        let err = file.load().expect_err("damage detected");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
