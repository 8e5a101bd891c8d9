//! Reading resources out of files: NDJSON, gzip NDJSON and Bundle JSON, one at a time.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::LoadError;

/// Lines longer than this are refused rather than buffered: one resource, not a whole file.
pub const MAX_RESOURCE_BYTES: usize = 64 * 1024 * 1024;

/// The input files named by the user, directories expanded (sorted, not recursive into
/// hidden entries), in a stable order.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| LoadError::Io {
                    path: path.display().to_string(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            entries.sort();
            for entry in entries {
                if entry.is_dir() {
                    files.extend(expand_paths(&[entry])?);
                } else if kind_of(&entry).is_some() {
                    files.push(entry);
                }
            }
        } else if kind_of(path).is_some() {
            files.push(path.clone());
        } else {
            return Err(LoadError::UnknownFileKind(path.display().to_string()));
        }
    }
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ndjson { gzip: bool },
    Bundle { gzip: bool },
}

fn kind_of(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let (stem, gzip) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_owned(), true),
        None => (name, false),
    };
    if stem.ends_with(".ndjson") || stem.ends_with(".jsonl") {
        Some(Kind::Ndjson { gzip })
    } else if stem.ends_with(".json") {
        Some(Kind::Bundle { gzip })
    } else {
        None
    }
}

/// Receives each item read: a resource's bytes, or why the item could not be read.
pub trait ItemSink: FnMut(Origin, Result<&[u8], String>) {}
impl<F: FnMut(Origin, Result<&[u8], String>)> ItemSink for F {}

/// Where a resource came from, for error messages (`file:line`).
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: String,
    /// Line number (NDJSON) or entry number (Bundle), from 1.
    pub position: u64,
    pub is_entry: bool,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_entry {
            write!(f, "{}:entry {}", self.file, self.position)
        } else {
            write!(f, "{}:{}", self.file, self.position)
        }
    }
}

/// Calls `each` with every resource of `path` (raw JSON bytes) or with the reason an item
/// could not be read. I/O errors that end the file are returned.
pub fn read_file(path: &Path, each: &mut dyn ItemSink) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let kind =
        kind_of(path).ok_or_else(|| LoadError::UnknownFileKind(path.display().to_string()))?;
    let raw: Box<dyn Read> = match kind {
        Kind::Ndjson { gzip: true } | Kind::Bundle { gzip: true } => Box::new(
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file)),
        ),
        _ => Box::new(file),
    };
    let reader = BufReader::with_capacity(1 << 20, raw);
    let name = path.display().to_string();
    match kind {
        Kind::Ndjson { .. } => read_ndjson(reader, &name, each).map_err(io),
        Kind::Bundle { .. } => {
            read_bundle(reader, &name, each);
            Ok(())
        }
    }
}

fn read_ndjson(
    mut reader: impl BufRead,
    name: &str,
    each: &mut dyn ItemSink,
) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(64 * 1024);
    let mut number = 0u64;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_RESOURCE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        let origin = Origin {
            file: name.to_owned(),
            position: number,
            is_entry: false,
        };
        if line.len() > MAX_RESOURCE_BYTES && line.last() != Some(&b'\n') {
            each(
                origin,
                Err(format!("line longer than {MAX_RESOURCE_BYTES} bytes")),
            );
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            while reader.read_until(b'\n', &mut rest)? > 0 && rest.last() != Some(&b'\n') {
                rest.clear();
            }
            continue;
        }
        let trimmed = line.trim_ascii();
        if !trimmed.is_empty() {
            each(origin, Ok(trimmed));
        }
    }
}

/// Streams a Bundle's `entry[].resource` one entry at a time, so a large Bundle file is never
/// held in memory whole.
fn read_bundle(reader: impl Read, name: &str, each: &mut dyn ItemSink) {
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let mut visitor = BundleVisitor {
        name,
        each,
        entries: 0,
    };
    let result = (&mut deserializer)
        .deserialize_map(&mut visitor)
        .and_then(|_| deserializer.end());
    if let Err(e) = result {
        (visitor.each)(
            Origin {
                file: name.to_owned(),
                position: visitor.entries + 1,
                is_entry: true,
            },
            Err(format!("the file is not a valid Bundle: {e}")),
        );
    }
}

struct BundleVisitor<'a, 'f> {
    name: &'a str,
    each: &'f mut dyn ItemSink,
    entries: u64,
}

impl<'de> Visitor<'de> for &mut BundleVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Bundle")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut resource_type = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "resourceType" => resource_type = Some(map.next_value::<String>()?),
                "entry" => map.next_value_seed(Entries(&mut *self))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match resource_type.as_deref() {
            Some("Bundle") => Ok(()),
            Some(other) => Err(de::Error::custom(format_args!(
                "resourceType is {other}, not Bundle"
            ))),
            None => Err(de::Error::custom("no resourceType")),
        }
    }
}

struct Entries<'v, 'a, 'f>(&'v mut BundleVisitor<'a, 'f>);

impl<'de> DeserializeSeed<'de> for Entries<'_, '_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        #[derive(serde::Deserialize)]
        struct Entry {
            resource: Option<Box<RawValue>>,
        }
        while let Some(entry) = seq.next_element::<Entry>()? {
            self.0.entries += 1;
            let origin = Origin {
                file: self.0.name.to_owned(),
                position: self.0.entries,
                is_entry: true,
            };
            match entry.resource {
                Some(raw) => (self.0.each)(origin, Ok(raw.get().as_bytes())),
                None => (self.0.each)(origin, Err("the entry has no resource".into())),
            }
        }
        Ok(())
    }
}
