//! The writing side of a download, on a blocking thread of its own: gzip decoding, line
//! counting and disk writes are CPU and I/O work that must not stall the async runtime that
//! reads the network. The async side sends what it receives; the sink answers how far the
//! file got, so an interrupted download can continue with `Range` on the identity
//! representation at exactly the decoded length.
//!
//! The file is written under a temporary name beside its final one and renamed only once it
//! is complete and its line count matches the manifest; a sink dropped before that (an error,
//! or the download cancelled) removes the temporary file.
//!
//! Decoded bytes go from zlib's output buffer straight to `write(2)`: at hundreds of MB/s the
//! copies a `Write` adapter chain adds (decoder buffer, `Vec`, `BufWriter`) cost more than the
//! decoding.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use flate2::{Decompress, FlushDecompress, Status};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::lines::LineCounter;
use crate::manifest::PlannedFile;
use crate::progress::Progress;

/// Decoded bytes collected before a write: large writes, yet small enough to stay in cache.
const OUTPUT_BUFFER: usize = 64 * 1024;
/// The gzip magic number, which starts every member.
const GZIP_MAGIC: u8 = 0x1f;

pub(crate) enum Message {
    /// A response body starts. It continues the file at `offset`; `0` starts it over.
    Begin {
        gzip: bool,
        offset: u64,
    },
    Data(Bytes),
    /// The body broke off. The answer is the offset to resume from (`0` when what was
    /// received cannot be trusted and the file must start over).
    Pause(oneshot::Sender<Result<u64, Error>>),
    /// The body ended. The sink verifies and commits the file.
    Finish(oneshot::Sender<Result<Finished, Error>>),
}

pub(crate) enum Finished {
    Saved {
        bytes: u64,
        lines: u64,
    },
    /// The body ended early after all (a gzip stream without its end); resume from here
    /// (`0`: start over).
    Resume(u64),
}

pub(crate) struct SinkConfig {
    pub file: PlannedFile,
    pub temp: PathBuf,
    pub progress: Arc<dyn Progress>,
    /// `fsync` the file before the rename, so a crash cannot leave a complete-looking name
    /// over incomplete data.
    pub sync: bool,
}

/// Why the current body stopped being written.
enum Broken {
    /// The gzip stream is corrupt: nothing after the last good byte can be trusted.
    Corrupt,
    Io(io::Error),
}

/// Where a gzip body is.
enum Gunzip {
    /// Inside a member.
    Member(Box<Decompress>),
    /// Between members: the next byte starts another one, or the stream is over.
    Between,
    /// After the last member: anything more is ignored, as gzip(1) does with trailing bytes.
    Trailing,
}

struct Sink {
    config: SinkConfig,
    file: File,
    counter: LineCounter,
    bytes: u64,
    gzip: Option<Gunzip>,
    output: Vec<u8>,
    broken: Option<Broken>,
    committed: bool,
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.config.temp);
        }
    }
}

/// Runs the sink until the async side finishes or goes away. Blocking: call it on a blocking
/// thread.
pub(crate) fn run(config: SinkConfig, mut messages: mpsc::Receiver<Message>) -> Result<(), Error> {
    if let Some(dir) = config.temp.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let file = File::create(&config.temp).map_err(|e| Error::io(&config.temp, e))?;
    let mut sink = Sink {
        config,
        file,
        counter: LineCounter::default(),
        bytes: 0,
        gzip: None,
        output: Vec::with_capacity(OUTPUT_BUFFER),
        broken: None,
        committed: false,
    };
    while let Some(message) = messages.blocking_recv() {
        match message {
            Message::Begin { gzip, offset } => sink.begin(gzip, offset)?,
            Message::Data(chunk) => sink.data(&chunk),
            Message::Pause(reply) => {
                let _ = reply.send(sink.pause());
            }
            Message::Finish(reply) => {
                let result = sink.finish();
                let done = matches!(result, Ok(Finished::Saved { .. }) | Err(_));
                let _ = reply.send(result);
                if done {
                    break;
                }
            }
        }
    }
    Ok(())
}

impl Sink {
    fn begin(&mut self, gzip: bool, offset: u64) -> Result<(), Error> {
        self.broken = None;
        self.output.clear();
        if offset == 0 && self.bytes > 0 {
            self.config.progress.file_restarted(
                &self.config.file,
                self.bytes,
                self.counter.finish(),
            );
            self.truncate()
                .map_err(|e| Error::io(&self.config.temp, e))?;
        } else if offset != self.bytes {
            return Err(Error::Download {
                url: self.config.file.url.to_string(),
                status: None,
                message: format!(
                    "internal: resuming at {offset} but {} bytes are saved",
                    self.bytes
                ),
            });
        }
        self.gzip = gzip.then_some(Gunzip::Between);
        Ok(())
    }

    fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.bytes = 0;
        self.counter = LineCounter::default();
        Ok(())
    }

    fn data(&mut self, chunk: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let (bytes_before, lines_before) = (self.bytes, self.counter.finish());
        match self.gzip.take() {
            Some(state) => {
                let state = self.inflate(state, chunk);
                self.gzip = Some(state);
            }
            None => self.write(chunk),
        }
        self.report(bytes_before, lines_before);
    }

    /// Decodes `input`, writing full output buffers as they fill.
    fn inflate(&mut self, mut state: Gunzip, mut input: &[u8]) -> Gunzip {
        while !input.is_empty() && self.broken.is_none() {
            let mut inflater = match state {
                Gunzip::Trailing => return Gunzip::Trailing,
                Gunzip::Between if input[0] != GZIP_MAGIC => return Gunzip::Trailing,
                Gunzip::Between => Box::new(Decompress::new_gzip(15)),
                Gunzip::Member(inflater) => inflater,
            };
            let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
            let result = inflater.decompress_vec(input, &mut self.output, FlushDecompress::None);
            let consumed = (inflater.total_in() - in_before) as usize;
            let produced = inflater.total_out() - out_before;
            input = &input[consumed.min(input.len())..];
            state = match result {
                Ok(Status::StreamEnd) => Gunzip::Between,
                Ok(_) if consumed == 0 && produced == 0 => {
                    // No progress with input and room to spare: not a stream zlib can read.
                    self.broken = Some(Broken::Corrupt);
                    Gunzip::Member(inflater)
                }
                Ok(_) => Gunzip::Member(inflater),
                Err(_) => {
                    self.broken = Some(Broken::Corrupt);
                    Gunzip::Member(inflater)
                }
            };
            if self.output.len() == self.output.capacity() || matches!(state, Gunzip::Between) {
                self.flush_output();
            }
        }
        state
    }

    fn flush_output(&mut self) {
        let output = std::mem::take(&mut self.output);
        self.write(&output);
        self.output = output;
        self.output.clear();
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || matches!(self.broken, Some(Broken::Io(_))) {
            return;
        }
        if let Err(e) = self.file.write_all(bytes) {
            self.broken = Some(Broken::Io(e));
            return;
        }
        self.counter.feed(bytes);
        self.bytes += bytes.len() as u64;
    }

    fn report(&self, bytes_before: u64, lines_before: u64) {
        let bytes = self.bytes - bytes_before;
        if bytes > 0 {
            let lines = self.counter.finish().saturating_sub(lines_before);
            self.config
                .progress
                .file_progress(&self.config.file, bytes, lines);
        }
    }

    /// Ends the current body with what it delivered so far: `Some(offset)` to resume from
    /// when it ended short (`0`: start over), `None` when it ended complete.
    fn settle(&mut self) -> Result<Option<u64>, Error> {
        let (bytes_before, lines_before) = (self.bytes, self.counter.finish());
        // Everything decodable was decoded as it came; what waits is the unwritten buffer.
        if !matches!(self.broken, Some(Broken::Corrupt)) {
            self.flush_output();
        }
        self.report(bytes_before, lines_before);
        let short = matches!(self.gzip.take(), Some(Gunzip::Member(_)));
        match self.broken.take() {
            Some(Broken::Io(e)) => Err(Error::io(&self.config.temp, e)),
            Some(Broken::Corrupt) => Ok(Some(0)),
            None => Ok(short.then_some(self.bytes)),
        }
    }

    fn pause(&mut self) -> Result<u64, Error> {
        Ok(self.settle()?.unwrap_or(self.bytes))
    }

    fn finish(&mut self) -> Result<Finished, Error> {
        if let Some(offset) = self.settle()? {
            return Ok(Finished::Resume(offset));
        }
        let lines = self.counter.finish();
        if let Some(expected) = self.config.file.count
            && expected != lines
        {
            return Err(Error::CountMismatch {
                path: self.config.file.path.clone(),
                expected,
                actual: lines,
            });
        }
        let temp = &self.config.temp;
        if self.config.sync {
            self.file.sync_all().map_err(|e| Error::io(temp, e))?;
        }
        std::fs::rename(temp, &self.config.file.path)
            .map_err(|e| Error::io(&self.config.file.path, e))?;
        self.committed = true;
        Ok(Finished::Saved {
            bytes: self.bytes,
            lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::manifest::FileKind;
    use crate::progress::Silent;

    fn ndjson(lines: usize) -> Vec<u8> {
        let mut text = Vec::new();
        for i in 0..lines {
            writeln!(
                text,
                "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"status\":\"final\"}}"
            )
            .unwrap();
        }
        text
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// A sink on its own thread, driven the way the async side drives it.
    struct Driver {
        sender: mpsc::Sender<Message>,
        thread: std::thread::JoinHandle<Result<(), Error>>,
        path: PathBuf,
        temp: PathBuf,
    }

    impl Driver {
        fn start(dir: &std::path::Path, count: Option<u64>) -> Self {
            let path = dir.join("Observation.1.ndjson");
            let temp = dir.join(".Observation.1.ndjson.part");
            let file = PlannedFile {
                index: 0,
                kind: FileKind::Output,
                resource_type: Some("Observation".into()),
                url: reqwest::Url::parse("http://h/f").unwrap(),
                count,
                path: path.clone(),
                requires_token: false,
            };
            let (sender, receiver) = mpsc::channel(4);
            let config = SinkConfig {
                file,
                temp: temp.clone(),
                progress: Arc::new(Silent),
                sync: false,
            };
            let thread = std::thread::spawn(move || run(config, receiver));
            Self {
                sender,
                thread,
                path,
                temp,
            }
        }

        fn send(&self, message: Message) {
            self.sender.blocking_send(message).unwrap();
        }

        fn pause(&self) -> u64 {
            let (reply, answer) = oneshot::channel();
            self.send(Message::Pause(reply));
            answer.blocking_recv().unwrap().unwrap()
        }

        fn finish(&self) -> Result<Finished, Error> {
            let (reply, answer) = oneshot::channel();
            self.send(Message::Finish(reply));
            answer.blocking_recv().unwrap()
        }
    }

    #[test]
    fn a_cut_gzip_body_resumes_as_identity_at_the_decoded_length() {
        let dir = tempfile::TempDir::new().unwrap();
        let original = ndjson(5000);
        let compressed = gzip(&original);
        let driver = Driver::start(dir.path(), Some(5000));

        driver.send(Message::Begin {
            gzip: true,
            offset: 0,
        });
        driver.send(Message::Data(Bytes::copy_from_slice(
            &compressed[..compressed.len() / 2],
        )));
        let offset = driver.pause() as usize;
        assert!(offset > 0 && offset < original.len(), "{offset}");
        assert_eq!(std::fs::read(&driver.temp).unwrap(), original[..offset]);

        driver.send(Message::Begin {
            gzip: false,
            offset: offset as u64,
        });
        driver.send(Message::Data(Bytes::copy_from_slice(&original[offset..])));
        match driver.finish() {
            Ok(Finished::Saved { bytes, lines }) => {
                assert_eq!(bytes, original.len() as u64);
                assert_eq!(lines, 5000);
            }
            _ => panic!("not saved"),
        }
        assert_eq!(std::fs::read(&driver.path).unwrap(), original);
        assert!(!driver.temp.exists());
        drop(driver.sender);
        driver.thread.join().unwrap().unwrap();
    }

    #[test]
    fn a_gzip_stream_without_its_end_asks_to_resume() {
        let dir = tempfile::TempDir::new().unwrap();
        let original = ndjson(2000);
        let compressed = gzip(&original);
        let driver = Driver::start(dir.path(), None);
        driver.send(Message::Begin {
            gzip: true,
            offset: 0,
        });
        driver.send(Message::Data(Bytes::copy_from_slice(
            &compressed[..compressed.len() * 3 / 4],
        )));
        assert!(matches!(driver.finish(), Ok(Finished::Resume(n)) if n > 0));
    }

    #[test]
    fn a_corrupt_gzip_body_starts_over_and_a_wrong_count_commits_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let original = ndjson(100);
        let mut corrupt = gzip(&original);
        let middle = corrupt.len() / 2;
        for byte in &mut corrupt[20..middle] {
            *byte = !*byte;
        }
        let driver = Driver::start(dir.path(), Some(99));
        driver.send(Message::Begin {
            gzip: true,
            offset: 0,
        });
        driver.send(Message::Data(Bytes::from(corrupt)));
        assert_eq!(driver.pause(), 0, "nothing after a corrupt byte is trusted");

        driver.send(Message::Begin {
            gzip: false,
            offset: 0,
        });
        driver.send(Message::Data(Bytes::from(original)));
        match driver.finish() {
            Err(Error::CountMismatch {
                expected: 99,
                actual: 100,
                ..
            }) => {}
            _ => panic!("the count is checked"),
        }
        driver.thread.join().unwrap().unwrap();
        assert!(!driver.path.exists());
        assert!(!driver.temp.exists(), "the temporary file is removed");
    }

    #[test]
    fn several_gzip_members_are_one_file_and_trailing_bytes_are_ignored() {
        let dir = tempfile::TempDir::new().unwrap();
        let (first, second) = (ndjson(10), ndjson(20));
        let mut body = gzip(&first);
        body.extend(gzip(&second));
        body.extend([0u8; 7]);
        let driver = Driver::start(dir.path(), Some(30));
        driver.send(Message::Begin {
            gzip: true,
            offset: 0,
        });
        for piece in body.chunks(5) {
            driver.send(Message::Data(Bytes::copy_from_slice(piece)));
        }
        assert!(matches!(
            driver.finish(),
            Ok(Finished::Saved { lines: 30, .. })
        ));
        let mut expected = first;
        expected.extend(second);
        assert_eq!(std::fs::read(&driver.path).unwrap(), expected);
    }
}
