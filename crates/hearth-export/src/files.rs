//! NDJSON files that roll over by size and never split a line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One finished file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub part: i64,
    /// File name inside the job directory.
    pub name: String,
    pub count: u64,
    pub bytes: u64,
}

/// Writes lines into `<dir>/<prefix>-p<part>.ndjson`, starting a new file before a line would
/// push the current one past `max_bytes` (a single larger line gets a file of its own).
pub struct RollingWriter {
    dir: PathBuf,
    prefix: String,
    max_bytes: u64,
    current: Option<(BufWriter<File>, WrittenFile)>,
    finished: Vec<WrittenFile>,
}

impl RollingWriter {
    pub fn new(dir: &Path, prefix: impl Into<String>, max_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            prefix: prefix.into(),
            max_bytes: max_bytes.max(1),
            current: None,
            finished: Vec::new(),
        }
    }

    /// Writes `line` and a newline.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let needed = line.len() as u64 + 1;
        let full = self
            .current
            .as_ref()
            .is_some_and(|(_, file)| file.count > 0 && file.bytes + needed > self.max_bytes);
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            let part = self.finished.len() as i64 + 1;
            let name = format!("{}-p{part}.ndjson", self.prefix);
            let file = File::create(self.dir.join(&name))?;
            self.current = Some((
                BufWriter::with_capacity(1 << 20, file),
                WrittenFile {
                    part,
                    name,
                    count: 0,
                    bytes: 0,
                },
            ));
        }
        if let Some((writer, file)) = self.current.as_mut() {
            writer.write_all(line)?;
            writer.write_all(b"\n")?;
            file.count += 1;
            file.bytes += needed;
        }
        Ok(())
    }

    fn close_current(&mut self) -> std::io::Result<()> {
        if let Some((writer, file)) = self.current.take() {
            writer.into_inner().map_err(|e| e.into_error())?;
            self.finished.push(file);
        }
        Ok(())
    }

    /// Flushes and returns every file written (none if no line was written).
    pub fn finish(mut self) -> std::io::Result<Vec<WrittenFile>> {
        self.close_current()?;
        Ok(std::mem::take(&mut self.finished))
    }

    /// Removes every file written so far.
    pub fn discard(mut self) {
        if let Some((_, file)) = self.current.take() {
            self.finished.push(file);
        }
        for file in &self.finished {
            let _ = std::fs::remove_file(self.dir.join(&file.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_over_by_bytes_without_splitting_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = RollingWriter::new(dir.path(), "u0-a1", 10);
        for line in ["aaaa", "bbbb", "cccc", "dddddddddddddddd", "e"] {
            writer.write_line(line.as_bytes()).unwrap();
        }
        let files = writer.finish().unwrap();
        let contents: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(dir.path().join(&f.name)).unwrap())
            .collect();
        assert_eq!(
            contents,
            ["aaaa\nbbbb\n", "cccc\n", "dddddddddddddddd\n", "e\n"]
        );
        assert_eq!(files.iter().map(|f| f.count).sum::<u64>(), 5);
        assert!(
            files
                .iter()
                .all(|f| f.bytes == std::fs::metadata(dir.path().join(&f.name)).unwrap().len())
        );
    }

    #[test]
    fn writes_no_file_for_no_lines() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RollingWriter::new(dir.path(), "u0-a1", 10);
        assert!(writer.finish().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
