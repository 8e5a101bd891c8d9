//! NDJSON files that roll over by size and never split a line, and files of resource blocks
//! (`organizeOutputBy`) that roll over between blocks.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One finished file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub part: i64,
    /// File name inside the job directory.
    pub name: String,
    pub count: u64,
    pub bytes: u64,
    /// The file's last block goes on in the next part (see [`BlockWriter`]).
    pub continues: bool,
}

/// The numbered part files `<dir>/<prefix>-p<part>.ndjson` of one writer: the open one and
/// those already closed.
struct Parts {
    dir: PathBuf,
    prefix: String,
    current: Option<(BufWriter<File>, WrittenFile)>,
    finished: Vec<WrittenFile>,
}

impl Parts {
    fn new(dir: &Path, prefix: String) -> Self {
        Self {
            dir: dir.to_owned(),
            prefix,
            current: None,
            finished: Vec::new(),
        }
    }

    fn create(&self, part: i64) -> std::io::Result<(BufWriter<File>, WrittenFile)> {
        let name = format!("{}-p{part}.ndjson", self.prefix);
        // Readable too: a block that moves on is copied back out of it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join(&name))?;
        Ok((
            BufWriter::with_capacity(1 << 20, file),
            WrittenFile {
                part,
                name,
                count: 0,
                bytes: 0,
                continues: false,
            },
        ))
    }

    /// The open file, opening the next part if none is.
    fn open(&mut self) -> std::io::Result<&mut WrittenFile> {
        if self.current.is_none() {
            self.current = Some(self.create(self.finished.len() as i64 + 1)?);
        }
        match self.current.as_mut() {
            Some((_, file)) => Ok(file),
            None => Err(std::io::Error::other("no open file")),
        }
    }

    fn current_file(&self) -> Option<&WrittenFile> {
        self.current.as_ref().map(|(_, file)| file)
    }

    /// Writes `line` and a newline to the open file.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.open()?;
        if let Some((writer, file)) = self.current.as_mut() {
            writer.write_all(line)?;
            writer.write_all(b"\n")?;
            file.count += 1;
            file.bytes += line.len() as u64 + 1;
        }
        Ok(())
    }

    fn close_current(&mut self, continues: bool) -> std::io::Result<()> {
        if let Some((writer, mut file)) = self.current.take() {
            writer.into_inner().map_err(|e| e.into_error())?;
            file.continues = continues;
            self.finished.push(file);
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<Vec<WrittenFile>> {
        self.close_current(false)?;
        Ok(self.finished)
    }

    fn discard(mut self) {
        if let Some((_, file)) = self.current.take() {
            self.finished.push(file);
        }
        for file in &self.finished {
            let _ = std::fs::remove_file(self.dir.join(&file.name));
        }
    }
}

/// Writes lines into `<dir>/<prefix>-p<part>.ndjson`, starting a new file before a line would
/// push the current one past `max_bytes` (a single larger line gets a file of its own).
pub struct RollingWriter {
    parts: Parts,
    max_bytes: u64,
}

impl RollingWriter {
    pub fn new(dir: &Path, prefix: impl Into<String>, max_bytes: u64) -> Self {
        Self {
            parts: Parts::new(dir, prefix.into()),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Writes `line` and a newline.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let needed = line.len() as u64 + 1;
        let full = self
            .parts
            .current_file()
            .is_some_and(|file| file.count > 0 && file.bytes + needed > self.max_bytes);
        if full {
            self.parts.close_current(false)?;
        }
        self.parts.append(line)
    }

    /// Flushes and returns every file written (none if no line was written).
    pub fn finish(self) -> std::io::Result<Vec<WrittenFile>> {
        self.parts.finish()
    }

    /// Removes every file written so far.
    pub fn discard(self) {
        self.parts.discard()
    }
}

/// Writes blocks (a header line, then the block's lines) into `<dir>/<prefix>-p<part>.ndjson`.
/// A block that no longer fits in the rest of a file moves to the next one, so files roll over
/// between blocks and stay within `max_bytes`. Only a block larger than `max_bytes` by itself
/// is split: its file is marked [`WrittenFile::continues`] and the next one starts with the
/// header again. A line larger than `max_bytes` is never split; it goes over the size.
///
/// Nothing of a block is held in memory: moving one copies its bytes from the end of the
/// file it started in to the next file, which is then truncated.
pub struct BlockWriter {
    parts: Parts,
    max_bytes: u64,
    /// The current block's header line.
    header: Vec<u8>,
    /// Where the current block starts in the current file: bytes and lines before it.
    block_start: (u64, u64),
}

impl BlockWriter {
    pub fn new(dir: &Path, prefix: impl Into<String>, max_bytes: u64) -> Self {
        Self {
            parts: Parts::new(dir, prefix.into()),
            max_bytes: max_bytes.max(1),
            header: Vec::new(),
            block_start: (0, 0),
        }
    }

    /// Starts a block with its header line.
    pub fn start_block(&mut self, header: &[u8]) -> std::io::Result<()> {
        self.header.clear();
        self.header.extend_from_slice(header);
        let needed = header.len() as u64 + 1;
        let full = self
            .parts
            .current_file()
            .is_some_and(|file| file.count > 0 && file.bytes + needed > self.max_bytes);
        if full {
            self.parts.close_current(false)?;
        }
        let file = self.parts.open()?;
        self.block_start = (file.bytes, file.count);
        self.parts.append(header)
    }

    /// Appends a line to the current block.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let needed = line.len() as u64 + 1;
        if self.overflows(needed) && self.block_start.0 > 0 {
            self.move_block()?;
        }
        let (_, lines_before) = self.block_start;
        let only_header = self
            .parts
            .current_file()
            .is_none_or(|file| file.count <= lines_before + 1);
        if self.overflows(needed) && !only_header {
            self.parts.close_current(true)?;
            self.block_start = (0, 0);
            self.parts.append(&self.header)?;
        }
        self.parts.append(line)
    }

    fn overflows(&self, needed: u64) -> bool {
        self.parts
            .current_file()
            .is_some_and(|file| file.bytes + needed > self.max_bytes)
    }

    /// Moves the current block from the end of the current file to the start of the next.
    fn move_block(&mut self) -> std::io::Result<()> {
        let Some((writer, mut file)) = self.parts.current.take() else {
            return Ok(());
        };
        let (offset, lines) = self.block_start;
        let mut old = writer.into_inner().map_err(|e| e.into_error())?;
        let (mut writer, mut next) = self.parts.create(self.parts.finished.len() as i64 + 2)?;
        old.seek(SeekFrom::Start(offset))?;
        let moved = std::io::copy(&mut (&old).take(file.bytes - offset), &mut writer)?;
        old.set_len(offset)?;
        next.bytes = moved;
        next.count = file.count - lines;
        file.bytes = offset;
        file.count = lines;
        self.parts.finished.push(file);
        self.parts.current = Some((writer, next));
        self.block_start = (0, 0);
        Ok(())
    }

    /// Flushes and returns every file written (none if no block was started).
    pub fn finish(self) -> std::io::Result<Vec<WrittenFile>> {
        self.parts.finish()
    }

    /// Removes every file written so far.
    pub fn discard(self) {
        self.parts.discard()
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
        assert_eq!(
            read_all(dir.path(), &files),
            ["aaaa\nbbbb\n", "cccc\n", "dddddddddddddddd\n", "e\n"]
        );
        assert_eq!(files.iter().map(|f| f.count).sum::<u64>(), 5);
        assert_sizes_on_disk(dir.path(), &files);
    }

    #[test]
    fn writes_no_file_for_no_lines() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RollingWriter::new(dir.path(), "u0-a1", 10);
        assert!(writer.finish().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    fn read_all(dir: &Path, files: &[WrittenFile]) -> Vec<String> {
        files
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(&f.name)).unwrap())
            .collect()
    }

    /// Each file's recorded size is its size on disk.
    fn assert_sizes_on_disk(dir: &Path, files: &[WrittenFile]) {
        for file in files {
            assert_eq!(
                file.bytes,
                std::fs::metadata(dir.join(&file.name)).unwrap().len()
            );
        }
    }

    #[test]
    fn blocks_move_to_the_next_file_rather_than_split() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = BlockWriter::new(dir.path(), "u0-a1-Patient", 14);
        for (header, lines) in [
            ("A", &["a1", "a2"][..]),
            ("B", &["b1", "b2"]),
            ("C", &["c"]),
        ] {
            writer.start_block(header.as_bytes()).unwrap();
            for line in lines {
                writer.write_line(line.as_bytes()).unwrap();
            }
        }
        let files = writer.finish().unwrap();
        // B no longer fitted after A: it moved, whole, to the second file.
        assert_eq!(
            read_all(dir.path(), &files),
            ["A\na1\na2\n", "B\nb1\nb2\nC\nc\n"]
        );
        assert!(files.iter().all(|f| !f.continues));
        assert_eq!(files.iter().map(|f| f.count).collect::<Vec<_>>(), [3, 5]);
        assert_sizes_on_disk(dir.path(), &files);
    }

    #[test]
    fn a_block_larger_than_a_file_continues_with_its_header_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = BlockWriter::new(dir.path(), "u0-a1-Patient", 12);
        writer.start_block(b"A").unwrap();
        writer.write_line(b"a1").unwrap();
        writer.start_block(b"B").unwrap();
        for line in ["b1", "b2", "b3", "b4", "b5"] {
            writer.write_line(line.as_bytes()).unwrap();
        }
        writer.start_block(b"C").unwrap();
        writer.write_line(b"a-line-longer-than-a-file").unwrap();
        let files = writer.finish().unwrap();
        assert_eq!(
            read_all(dir.path(), &files),
            [
                "A\na1\n",
                "B\nb1\nb2\nb3\n",
                "B\nb4\nb5\n",
                "C\na-line-longer-than-a-file\n"
            ]
        );
        assert_eq!(
            files.iter().map(|f| f.continues).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        assert_eq!(
            files.iter().map(|f| f.part).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }
}
