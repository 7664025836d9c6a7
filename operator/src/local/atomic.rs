use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` so that a reader sees the old file or the new one, never a
/// half-written one, and a crash leaves at worst a stray `.tmp` file beside it.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().map(ToOwned::to_owned).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.yaml");
        write_atomically(&path, b"a very long first version").expect("first write");
        write_atomically(&path, b"short").expect("second write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "short");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
