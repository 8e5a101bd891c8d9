//! PostgreSQL's binary `COPY` format: bodies go in as they are, where the text format would
//! escape every backslash and hex-encode every byte of a `bytea`.

/// Tuples in the binary `COPY` format, handed to the server in chunks of about a megabyte.
pub(super) struct CopyBuffer {
    bytes: Vec<u8>,
}

const CHUNK: usize = 1 << 20;

impl CopyBuffer {
    pub(super) fn new() -> Self {
        let mut bytes = Vec::with_capacity(CHUNK + 64 * 1024);
        bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        bytes.extend_from_slice(&0i32.to_be_bytes()); // flags
        bytes.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self { bytes }
    }

    pub(super) fn tuple(&mut self, fields: i16) {
        self.bytes.extend_from_slice(&fields.to_be_bytes());
    }

    pub(super) fn int8(&mut self, value: i64) {
        self.bytes.extend_from_slice(&8i32.to_be_bytes());
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn optional_int8(&mut self, value: Option<i64>) {
        match value {
            Some(value) => self.int8(value),
            None => self.bytes.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    pub(super) fn int4(&mut self, value: i32) {
        self.bytes.extend_from_slice(&4i32.to_be_bytes());
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn boolean(&mut self, value: bool) {
        self.bytes.extend_from_slice(&1i32.to_be_bytes());
        self.bytes.push(value.into());
    }

    pub(super) fn bytes(&mut self, value: &[u8]) {
        self.bytes
            .extend_from_slice(&(value.len() as i32).to_be_bytes());
        self.bytes.extend_from_slice(value);
    }

    pub(super) fn text(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    pub(super) fn is_full(&self) -> bool {
        self.bytes.len() >= CHUNK
    }

    /// The bytes so far; the buffer goes on with the next tuple.
    pub(super) fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.bytes, Vec::with_capacity(CHUNK + 64 * 1024))
    }

    /// The rest, with the end-of-data marker.
    pub(super) fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
        self.bytes
    }
}
