//! NumPy `.npy` files: a strict reader for 2-D little-endian float32/float64 C-order arrays
//! (format versions 1.0, 2.0 and 3.0) and an atomic float32 writer.
//!
//! The format (numpy's `numpy/lib/format.py`): the magic string `\x93NUMPY`, a major and a minor
//! version byte, the header length (u16 little-endian in 1.0, u32 in 2.0 and 3.0), then the header:
//! a Python dict literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`
//! padded with spaces and ended by a newline (latin-1 text in 1.0 and 2.0, UTF-8 in 3.0), then the
//! raw array data. Every refusal is a typed [`NpyProblem`] naming the file; nothing here panics
//! on bad input.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DatasetError, NpyProblem};
use crate::progress;

/// The magic string every `.npy` file starts with.
const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Largest accepted header (numpy itself refuses headers over 10 000 bytes by default).
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Data is converted in chunks of this many bytes (a multiple of every item size).
const CHUNK_BYTES: usize = 1 << 20;
/// Files with more data than this show a progress bar while loading.
const PROGRESS_THRESHOLD_BYTES: u64 = 256 << 20;

/// A dense row-major float32 matrix read from or written to a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyMatrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns (the embedding dimension).
    pub dim: usize,
    /// Row-major values, `rows * dim` of them.
    pub data: Vec<f32>,
}

impl NpyMatrix {
    /// Row `index`, or `None` past the end.
    pub fn row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.dim)?;
        self.data.get(start..start.checked_add(self.dim)?)
    }
}

/// Element type of the array data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    /// `<f4`.
    Float32,
    /// `<f8`.
    Float64,
}

impl Dtype {
    fn size(self) -> u64 {
        match self {
            Self::Float32 => 4,
            Self::Float64 => 8,
        }
    }
}

/// The validated header of a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
struct NpyHeader {
    dtype: Dtype,
    rows: u64,
    dim: u64,
}

/// Reads a 2-D float32 or float64 (converted to float32) C-order `.npy` file.
///
/// Refuses, with an error naming the file and the problem: a bad magic string, versions other
/// than 1.0/2.0/3.0, malformed headers, dtypes other than `<f4`/`<f8` (big-endian included),
/// Fortran order, shapes that are not `(rows, dim)` with `dim >= 1`, truncated data, trailing
/// bytes, non-finite values and float64 values that overflow float32. Loading files over 256 MiB
/// shows a progress bar on stderr.
pub fn read_npy(path: &Path) -> Result<NpyMatrix, DatasetError> {
    let file =
        File::open(path).map_err(|source| DatasetError::io(path, "open the file", source))?;
    let file_bytes = file
        .metadata()
        .map_err(|source| DatasetError::io(path, "read the file's metadata", source))?
        .len();
    let mut reader = BufReader::with_capacity(CHUNK_BYTES, file);
    read_npy_from(&mut reader, file_bytes, path, true)
}

/// Parses an in-memory `.npy` file with the same checks as [`read_npy`]; `name` is used in errors.
pub fn read_npy_bytes(bytes: &[u8], name: &Path) -> Result<NpyMatrix, DatasetError> {
    let mut reader = bytes;
    read_npy_from(&mut reader, bytes.len() as u64, name, false)
}

fn read_npy_from(
    reader: &mut impl Read,
    total_bytes: u64,
    path: &Path,
    allow_progress: bool,
) -> Result<NpyMatrix, DatasetError> {
    let fail = |problem| DatasetError::npy(path, problem);
    let read_error = |source| DatasetError::io(path, "read the file", source);

    let prelude_len = total_bytes.min(8) as usize;
    let mut prelude = [0u8; 8];
    reader
        .read_exact(&mut prelude[..prelude_len])
        .map_err(read_error)?;
    let magic_len = prelude_len.min(MAGIC.len());
    if prelude[..magic_len] != MAGIC[..magic_len] {
        return Err(fail(NpyProblem::BadMagic));
    }
    if prelude_len < 8 {
        return Err(fail(NpyProblem::TruncatedHeader {
            file_bytes: total_bytes,
            needed: 10,
        }));
    }
    let (major, minor) = (prelude[6], prelude[7]);
    let length_field_bytes: u64 = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(fail(NpyProblem::UnsupportedVersion { major, minor })),
    };
    let length_end = 8 + length_field_bytes;
    if total_bytes < length_end {
        return Err(fail(NpyProblem::TruncatedHeader {
            file_bytes: total_bytes,
            needed: length_end,
        }));
    }
    let mut length_field = [0u8; 4];
    reader
        .read_exact(&mut length_field[..length_field_bytes as usize])
        .map_err(read_error)?;
    let header_len = u64::from(u32::from_le_bytes(length_field));
    if header_len > MAX_HEADER_BYTES {
        return Err(fail(NpyProblem::HeaderTooLarge {
            length: header_len,
            limit: MAX_HEADER_BYTES,
        }));
    }
    let data_offset = length_end + header_len;
    if total_bytes < data_offset {
        return Err(fail(NpyProblem::TruncatedHeader {
            file_bytes: total_bytes,
            needed: data_offset,
        }));
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    reader.read_exact(&mut header_bytes).map_err(read_error)?;
    let header_text = decode_header(&header_bytes, major).map_err(fail)?;
    let header = parse_header(&header_text).map_err(fail)?;

    let data_bytes = total_bytes - data_offset;
    let expected_bytes = header
        .rows
        .checked_mul(header.dim)
        .and_then(|values| values.checked_mul(header.dtype.size()))
        .ok_or(NpyProblem::SizeOverflow {
            rows: header.rows,
            dim: header.dim,
        })
        .map_err(fail)?;
    if data_bytes < expected_bytes {
        return Err(fail(NpyProblem::TruncatedData {
            expected: expected_bytes,
            actual: data_bytes,
        }));
    }
    if data_bytes > expected_bytes {
        return Err(fail(NpyProblem::TrailingBytes {
            expected: expected_bytes,
            extra: data_bytes - expected_bytes,
        }));
    }
    let too_large = NpyProblem::SizeOverflow {
        rows: header.rows,
        dim: header.dim,
    };
    let rows = usize::try_from(header.rows).map_err(|_| fail(too_large.clone()))?;
    let dim = usize::try_from(header.dim).map_err(|_| fail(too_large.clone()))?;
    let values = rows
        .checked_mul(dim)
        .ok_or_else(|| fail(too_large.clone()))?;
    let mut data = Vec::new();
    data.try_reserve_exact(values)
        .map_err(|_| fail(too_large.clone()))?;

    let bar = progress::bar(
        expected_bytes,
        "loading .npy",
        allow_progress && expected_bytes >= PROGRESS_THRESHOLD_BYTES,
    );
    let mut chunk = vec![0u8; CHUNK_BYTES.min(expected_bytes as usize)];
    let mut remaining = expected_bytes;
    while remaining > 0 {
        let take = (remaining as usize).min(chunk.len());
        let bytes = &mut chunk[..take];
        reader.read_exact(bytes).map_err(read_error)?;
        convert_chunk(bytes, header.dtype, dim, &mut data).map_err(fail)?;
        remaining -= take as u64;
        bar.inc(take as u64);
    }
    bar.finish_and_clear();
    Ok(NpyMatrix { rows, dim, data })
}

/// Appends the values of `bytes` to `data`, refusing non-finite values and float32 overflow.
fn convert_chunk(
    bytes: &[u8],
    dtype: Dtype,
    dim: usize,
    data: &mut Vec<f32>,
) -> Result<(), NpyProblem> {
    let position = |index: usize| (index / dim, index % dim);
    match dtype {
        Dtype::Float32 => {
            for word in bytes.chunks_exact(4) {
                let value = f32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                if !value.is_finite() {
                    let (row, column) = position(data.len());
                    return Err(NpyProblem::NonFinite { row, column });
                }
                data.push(value);
            }
        }
        Dtype::Float64 => {
            for word in bytes.chunks_exact(8) {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(word);
                let value = f64::from_le_bytes(raw);
                let (row, column) = position(data.len());
                if !value.is_finite() {
                    return Err(NpyProblem::NonFinite { row, column });
                }
                let narrowed = value as f32;
                if narrowed.is_infinite() {
                    return Err(NpyProblem::Float32Overflow { row, column, value });
                }
                data.push(narrowed);
            }
        }
    }
    Ok(())
}

fn decode_header(bytes: &[u8], major: u8) -> Result<String, NpyProblem> {
    if major >= 3 {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| NpyProblem::HeaderEncoding { encoding: "UTF-8" })
    } else {
        // Latin-1 maps every byte to the code point of the same value.
        Ok(bytes.iter().map(|&byte| char::from(byte)).collect())
    }
}

/// A value of the header dictionary.
#[derive(Debug, Clone, PartialEq)]
enum HeaderValue {
    Text(String),
    Bool(bool),
    Tuple(Vec<u64>),
    /// A list (a structured dtype), kept as its source text.
    List(String),
}

fn malformed(reason: impl Into<String>) -> NpyProblem {
    NpyProblem::MalformedHeader {
        reason: reason.into(),
    }
}

/// Parses and validates the header dictionary.
fn parse_header(text: &str) -> Result<NpyHeader, NpyProblem> {
    let entries = DictParser::new(text).parse()?;
    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;
    for (key, value) in entries {
        let slot = match key.as_str() {
            "descr" => &mut descr,
            "fortran_order" => &mut fortran_order,
            "shape" => &mut shape,
            _ => return Err(malformed(format!("unexpected key '{key}'"))),
        };
        if slot.replace(value).is_some() {
            return Err(malformed(format!("duplicate key '{key}'")));
        }
    }
    let dtype = match descr {
        Some(HeaderValue::Text(descr)) => match descr.as_str() {
            "<f4" => Dtype::Float32,
            "<f8" => Dtype::Float64,
            ">f4" | ">f8" => return Err(NpyProblem::BigEndian { descr }),
            _ => return Err(NpyProblem::UnsupportedDtype { descr }),
        },
        Some(HeaderValue::List(descr)) => return Err(NpyProblem::UnsupportedDtype { descr }),
        Some(_) => return Err(malformed("'descr' is not a string")),
        None => return Err(malformed("missing key 'descr'")),
    };
    match fortran_order {
        Some(HeaderValue::Bool(false)) => {}
        Some(HeaderValue::Bool(true)) => return Err(NpyProblem::FortranOrder),
        Some(_) => return Err(malformed("'fortran_order' is not True or False")),
        None => return Err(malformed("missing key 'fortran_order'")),
    }
    let shape = match shape {
        Some(HeaderValue::Tuple(shape)) => shape,
        Some(_) => return Err(malformed("'shape' is not a tuple of integers")),
        None => return Err(malformed("missing key 'shape'")),
    };
    let [rows, dim] = shape[..] else {
        return Err(NpyProblem::NotTwoDimensional { shape });
    };
    if dim == 0 {
        return Err(NpyProblem::ZeroDimension { rows });
    }
    Ok(NpyHeader { dtype, rows, dim })
}

/// A parser for the restricted Python dict literals numpy writes as headers.
struct DictParser<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> DictParser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, position: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    fn describe_here(&self) -> String {
        match self.text[self.position..].chars().next() {
            Some(found) => format!(
                "unexpected '{}' at byte {}",
                found.escape_default(),
                self.position
            ),
            None => "unexpected end of header".to_string(),
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), NpyProblem> {
        if self.peek() == Some(byte) {
            self.position += 1;
            Ok(())
        } else {
            Err(malformed(format!(
                "{} (expected '{}')",
                self.describe_here(),
                char::from(byte)
            )))
        }
    }

    fn parse(mut self) -> Result<Vec<(String, HeaderValue)>, NpyProblem> {
        self.skip_whitespace();
        self.expect(b'{')?;
        let mut entries = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some(b'}') {
                self.position += 1;
                break;
            }
            let key = match self.peek() {
                Some(b'\'' | b'"') => self.parse_string()?,
                _ => {
                    return Err(malformed(format!(
                        "{} (expected a key)",
                        self.describe_here()
                    )));
                }
            };
            self.skip_whitespace();
            self.expect(b':')?;
            self.skip_whitespace();
            let value = self.parse_value()?;
            entries.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b'}') => {
                    self.position += 1;
                    break;
                }
                _ => {
                    return Err(malformed(format!(
                        "{} (expected ',' or '}}')",
                        self.describe_here()
                    )));
                }
            }
        }
        self.skip_whitespace();
        if self.position != self.text.len() {
            return Err(malformed(format!(
                "{} after the dictionary",
                self.describe_here()
            )));
        }
        Ok(entries)
    }

    fn parse_string(&mut self) -> Result<String, NpyProblem> {
        let Some(quote) = self.peek() else {
            return Err(malformed("unexpected end of header (expected a string)"));
        };
        let start = self.position + 1;
        let Some(length) = self.text[start..].find(char::from(quote)) else {
            return Err(malformed(format!(
                "unterminated string at byte {}",
                self.position
            )));
        };
        let content = &self.text[start..start + length];
        if content.contains('\\') {
            return Err(malformed(format!(
                "escape sequences are not supported (string at byte {})",
                self.position
            )));
        }
        self.position = start + length + 1;
        Ok(content.to_string())
    }

    fn parse_value(&mut self) -> Result<HeaderValue, NpyProblem> {
        let rest = &self.text[self.position..];
        match self.peek() {
            Some(b'\'' | b'"') => self.parse_string().map(HeaderValue::Text),
            Some(b'(') => self.parse_tuple().map(HeaderValue::Tuple),
            Some(b'[') => self.parse_list().map(HeaderValue::List),
            _ if rest.starts_with("True") => {
                self.position += 4;
                Ok(HeaderValue::Bool(true))
            }
            _ if rest.starts_with("False") => {
                self.position += 5;
                Ok(HeaderValue::Bool(false))
            }
            _ => Err(malformed(format!(
                "{} (expected a value)",
                self.describe_here()
            ))),
        }
    }

    fn parse_tuple(&mut self) -> Result<Vec<u64>, NpyProblem> {
        self.expect(b'(')?;
        let mut values = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some(b')') {
                self.position += 1;
                return Ok(values);
            }
            values.push(self.parse_integer()?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b')') => {
                    self.position += 1;
                    return Ok(values);
                }
                _ => {
                    return Err(malformed(format!(
                        "{} in 'shape' (expected ',' or ')')",
                        self.describe_here()
                    )));
                }
            }
        }
    }

    fn parse_integer(&mut self) -> Result<u64, NpyProblem> {
        let start = self.position;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.position += 1;
        }
        if start == self.position {
            return Err(malformed(format!(
                "{} in 'shape' (expected a non-negative integer)",
                self.describe_here()
            )));
        }
        let digits = &self.text[start..self.position];
        // Python 2 wrote long integers with an `L` suffix.
        if matches!(self.peek(), Some(b'L' | b'l')) {
            self.position += 1;
        }
        digits
            .parse::<u64>()
            .map_err(|_| malformed(format!("shape entry {digits} is too large")))
    }

    /// Skips a (possibly nested) list, returning its source text.
    fn parse_list(&mut self) -> Result<String, NpyProblem> {
        let start = self.position;
        let mut depth = 0usize;
        let mut quote: Option<u8> = None;
        while let Some(byte) = self.peek() {
            self.position += 1;
            match (quote, byte) {
                (Some(open), _) if byte == open => quote = None,
                (Some(_), _) => {}
                (None, b'\'' | b'"') => quote = Some(byte),
                (None, b'[' | b'(') => depth += 1,
                (None, b']' | b')') => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Ok(self.text[start..self.position].to_string());
                    }
                }
                (None, _) => {}
            }
        }
        Err(malformed(format!("unterminated list at byte {start}")))
    }
}

/// Builds the header of a version 1.0 float32 C-order `.npy` file of shape `(rows, dim)`, padded
/// so that the data starts at a multiple of 64 bytes.
fn float32_header(rows: usize, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let padding = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + padding + 1;
    let mut bytes = Vec::with_capacity(unpadded + padding);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    // The dict of two integers is far below 64 KiB, so the u16 length of version 1.0 suffices.
    bytes.extend_from_slice(&(header_len as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.extend(std::iter::repeat_n(b' ', padding));
    bytes.push(b'\n');
    bytes
}

/// Writes a 2-D float32 C-order `.npy` file (format 1.0) of shape `(rows, dim)` atomically
/// (temporary file in the same folder, fsync, rename).
///
/// Refuses `data.len() != rows * dim`, `dim == 0` and non-finite values, so everything written
/// can be read back by [`read_npy`].
pub fn write_npy(path: &Path, rows: usize, dim: usize, data: &[f32]) -> Result<(), DatasetError> {
    let fail = |problem| DatasetError::npy(path, problem);
    let expected = rows.checked_mul(dim);
    if expected != Some(data.len()) {
        return Err(fail(NpyProblem::DataLength {
            expected: (rows as u64).saturating_mul(dim as u64),
            actual: data.len() as u64,
        }));
    }
    if dim == 0 {
        return Err(fail(NpyProblem::ZeroDimension { rows: rows as u64 }));
    }
    if let Some(index) = data.iter().position(|value| !value.is_finite()) {
        return Err(fail(NpyProblem::NonFinite {
            row: index / dim,
            column: index % dim,
        }));
    }
    write_atomically(path, |writer| {
        writer.write_all(&float32_header(rows, dim))?;
        let mut buffer = Vec::with_capacity(CHUNK_BYTES);
        for values in data.chunks(CHUNK_BYTES / 4) {
            buffer.clear();
            for value in values {
                buffer.extend_from_slice(&value.to_le_bytes());
            }
            writer.write_all(&buffer)?;
        }
        Ok(())
    })
}

/// Writes a file by filling a temporary sibling, syncing it and renaming it over `path`.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<(), DatasetError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(file_name) = path.file_name() else {
        return Err(DatasetError::io(
            path,
            "write the file",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path has no file name",
            ),
        ));
    };
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temporary = folder.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = File::create(&temporary)
            .map_err(|source| DatasetError::io(&temporary, "create the file", source))?;
        let mut writer = BufWriter::with_capacity(CHUNK_BYTES, &file);
        fill(&mut writer)
            .and_then(|()| writer.flush())
            .map_err(|source| DatasetError::io(&temporary, "write the file", source))?;
        drop(writer);
        file.sync_all()
            .map_err(|source| DatasetError::io(&temporary, "sync the file", source))?;
        std::fs::rename(&temporary, path)
            .map_err(|source| DatasetError::io(path, "rename the temporary file onto", source))
    })();
    if result.is_err() {
        // Best effort: the temporary file may not exist, and the original error matters more.
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` file with the given version, header text and data bytes.
    fn npy_file(version: (u8, u8), header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[version.0, version.1]);
        if version.0 == 1 {
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn f64_bytes(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn header(descr: &str, fortran: &str, shape: &str) -> String {
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}\n")
    }

    fn problem(bytes: &[u8]) -> NpyProblem {
        match read_npy_bytes(bytes, Path::new("test.npy")) {
            Err(DatasetError::Npy { path, problem }) => {
                assert_eq!(path, Path::new("test.npy"));
                problem
            }
            other => panic!("expected an npy error, got {other:?}"),
        }
    }

    #[test]
    fn write_then_read_round_trips_and_aligns_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.npy");
        let data: Vec<f32> = (0..21).map(|v| v as f32 * 0.25 - 2.0).collect();
        write_npy(&path, 7, 3, &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            (bytes.len() - 21 * 4) % 64,
            0,
            "data starts at a multiple of 64"
        );
        assert_eq!(bytes[bytes.len() - 21 * 4 - 1], b'\n');
        let matrix = read_npy(&path).unwrap();
        assert_eq!((matrix.rows, matrix.dim), (7, 3));
        assert_eq!(matrix.data, data);
        assert_eq!(matrix.row(2), Some(&data[6..9]));
        assert_eq!(matrix.row(7), None);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Overwriting replaces the file.
        write_npy(&path, 1, 2, &[1.0, 2.0]).unwrap();
        assert_eq!(read_npy(&path).unwrap().data, vec![1.0, 2.0]);
    }

    #[test]
    fn empty_matrices_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.npy");
        write_npy(&path, 0, 4, &[]).unwrap();
        let matrix = read_npy(&path).unwrap();
        assert_eq!((matrix.rows, matrix.dim, matrix.data.len()), (0, 4, 0));
    }

    #[test]
    fn reads_all_versions_and_float64() {
        let values = [1.5_f64, -2.25, 3.0e-3, 4.0e30, 0.0, -0.0];
        let expected: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        for version in [(1, 0), (2, 0), (3, 0)] {
            let bytes = npy_file(
                version,
                &header("<f8", "False", "(2, 3)"),
                &f64_bytes(&values),
            );
            let matrix = read_npy_bytes(&bytes, Path::new("x.npy")).unwrap();
            assert_eq!((matrix.rows, matrix.dim), (2, 3));
            assert_eq!(matrix.data, expected);
        }
        // Double quotes, odd spacing, no trailing comma, Python 2 longs.
        let header = "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(1L,2L)}";
        let bytes = npy_file((1, 0), header, &f32_bytes(&[1.0, 2.0]));
        assert_eq!(
            read_npy_bytes(&bytes, Path::new("x.npy")).unwrap().data,
            vec![1.0, 2.0]
        );
        // Version 3.0 allows UTF-8 in the header.
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1), }   \n";
        let bytes = npy_file((3, 0), header, &f32_bytes(&[7.0]));
        assert_eq!(
            read_npy_bytes(&bytes, Path::new("x.npy")).unwrap().data,
            vec![7.0]
        );
    }

    #[test]
    fn refuses_bad_magic_and_versions() {
        assert_eq!(problem(b"PK\x03\x04 not numpy"), NpyProblem::BadMagic);
        assert_eq!(
            problem(b""),
            NpyProblem::TruncatedHeader {
                file_bytes: 0,
                needed: 10
            }
        );
        assert!(matches!(
            problem(b"\x93NUM"),
            NpyProblem::TruncatedHeader { .. }
        ));
        let data = f32_bytes(&[1.0]);
        for version in [(0, 0), (1, 1), (4, 0), (2, 1)] {
            let bytes = npy_file((2, 0), &header("<f4", "False", "(1, 1)"), &data);
            let mut bytes = bytes;
            bytes[6] = version.0;
            bytes[7] = version.1;
            assert_eq!(
                problem(&bytes),
                NpyProblem::UnsupportedVersion {
                    major: version.0,
                    minor: version.1
                }
            );
        }
    }

    #[test]
    fn refuses_truncated_and_oversized_headers() {
        let full = npy_file((1, 0), &header("<f4", "False", "(1, 1)"), &[]);
        for cut in [8, 9, 10, 20, full.len() - 1] {
            assert!(
                matches!(problem(&full[..cut]), NpyProblem::TruncatedHeader { .. }),
                "cut at {cut}"
            );
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[2, 0]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(problem(&huge), NpyProblem::HeaderTooLarge { .. }));
    }

    #[test]
    fn refuses_dtypes_other_than_little_endian_floats() {
        let data = [0u8; 8];
        for descr in [">f4", ">f8"] {
            let bytes = npy_file((1, 0), &header(descr, "False", "(1, 1)"), &data);
            assert_eq!(
                problem(&bytes),
                NpyProblem::BigEndian {
                    descr: descr.into()
                }
            );
        }
        for descr in ["<i4", "<f2", "|u1", "=f4", "<c8", ">i8"] {
            let bytes = npy_file((1, 0), &header(descr, "False", "(1, 1)"), &data);
            assert_eq!(
                problem(&bytes),
                NpyProblem::UnsupportedDtype {
                    descr: descr.into()
                }
            );
        }
        let structured =
            "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (1,), }";
        let bytes = npy_file((1, 0), structured, &data);
        assert!(matches!(
            problem(&bytes),
            NpyProblem::UnsupportedDtype { .. }
        ));
    }

    #[test]
    fn refuses_fortran_order_and_wrong_shapes() {
        let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        let bytes = npy_file((1, 0), &header("<f4", "True", "(2, 2)"), &data);
        assert_eq!(problem(&bytes), NpyProblem::FortranOrder);
        for (shape, dims) in [
            ("(4,)", vec![4]),
            ("()", vec![]),
            ("(1, 2, 2)", vec![1, 2, 2]),
        ] {
            let bytes = npy_file((1, 0), &header("<f4", "False", shape), &data);
            assert_eq!(
                problem(&bytes),
                NpyProblem::NotTwoDimensional { shape: dims }
            );
        }
        let bytes = npy_file((1, 0), &header("<f4", "False", "(3, 0)"), &[]);
        assert_eq!(problem(&bytes), NpyProblem::ZeroDimension { rows: 3 });
        let bytes = npy_file(
            (1, 0),
            &header(
                "<f4",
                "False",
                "(18446744073709551615, 18446744073709551615)",
            ),
            &data,
        );
        assert!(matches!(problem(&bytes), NpyProblem::SizeOverflow { .. }));
    }

    #[test]
    fn refuses_truncated_and_trailing_data() {
        let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let bytes = npy_file((1, 0), &header("<f4", "False", "(2, 3)"), &data[..20]);
        assert_eq!(
            problem(&bytes),
            NpyProblem::TruncatedData {
                expected: 24,
                actual: 20
            }
        );
        let mut long = data.clone();
        long.push(0);
        let bytes = npy_file((1, 0), &header("<f4", "False", "(2, 3)"), &long);
        assert_eq!(
            problem(&bytes),
            NpyProblem::TrailingBytes {
                expected: 24,
                extra: 1
            }
        );
    }

    #[test]
    fn refuses_malformed_headers() {
        let data = f32_bytes(&[1.0]);
        let malformed_headers = [
            "",
            "not a dict",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'shape': (1, 1)}",
            "{'fortran_order': False, 'shape': (1, 1)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1), 'extra': 1}",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1, 1)}",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1, 1)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': [1, 1]}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, -1)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1 1)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1)",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1)} trailing",
            "{'descr: '<f4', 'fortran_order': False, 'shape': (1, 1)}",
            "{'descr': '<f4' 'fortran_order': False, 'shape': (1, 1)}",
            "{'descr': 4, 'fortran_order': False, 'shape': (1, 1)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 99999999999999999999999)}",
            "{'descr': '\\x3cf4', 'fortran_order': False, 'shape': (1, 1)}",
        ];
        for text in malformed_headers {
            let bytes = npy_file((1, 0), text, &data);
            assert!(
                matches!(problem(&bytes), NpyProblem::MalformedHeader { .. }),
                "{text}: {:?}",
                problem(&bytes)
            );
        }
        let mut bytes = npy_file((3, 0), &header("<f4", "False", "(1, 1)"), &data);
        bytes[12] = 0xff;
        assert_eq!(
            problem(&bytes),
            NpyProblem::HeaderEncoding { encoding: "UTF-8" }
        );
    }

    #[test]
    fn refuses_non_finite_values_and_float32_overflow() {
        let bytes = npy_file(
            (1, 0),
            &header("<f4", "False", "(2, 2)"),
            &f32_bytes(&[1.0, 2.0, 3.0, f32::NAN]),
        );
        assert_eq!(problem(&bytes), NpyProblem::NonFinite { row: 1, column: 1 });
        let bytes = npy_file(
            (1, 0),
            &header("<f8", "False", "(1, 3)"),
            &f64_bytes(&[1.0, f64::NEG_INFINITY, 0.0]),
        );
        assert_eq!(problem(&bytes), NpyProblem::NonFinite { row: 0, column: 1 });
        let bytes = npy_file(
            (1, 0),
            &header("<f8", "False", "(2, 1)"),
            &f64_bytes(&[f64::from(f32::MAX), 1e39]),
        );
        assert_eq!(
            problem(&bytes),
            NpyProblem::Float32Overflow {
                row: 1,
                column: 0,
                value: 1e39
            }
        );
    }

    #[test]
    fn errors_from_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fortran.npy");
        let data = f32_bytes(&[1.0, 2.0]);
        std::fs::write(
            &path,
            npy_file((1, 0), &header("<f4", "True", "(1, 2)"), &data),
        )
        .unwrap();
        let message = read_npy(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("Fortran"), "{message}");
        let missing = dir.path().join("missing.npy");
        let error = read_npy(&missing).unwrap_err();
        assert!(matches!(error, DatasetError::Io { .. }));
        assert!(error.to_string().contains("missing.npy"));
    }

    #[test]
    fn writer_refuses_inconsistent_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.npy");
        let error = write_npy(&path, 2, 3, &[0.0; 5]).unwrap_err();
        assert!(matches!(
            error,
            DatasetError::Npy {
                problem: NpyProblem::DataLength {
                    expected: 6,
                    actual: 5
                },
                ..
            }
        ));
        assert!(matches!(
            write_npy(&path, 2, 0, &[]).unwrap_err(),
            DatasetError::Npy {
                problem: NpyProblem::ZeroDimension { .. },
                ..
            }
        ));
        assert!(matches!(
            write_npy(&path, 1, 2, &[0.0, f32::INFINITY]).unwrap_err(),
            DatasetError::Npy {
                problem: NpyProblem::NonFinite { row: 0, column: 1 },
                ..
            }
        ));
        assert!(matches!(
            write_npy(&path, usize::MAX, 2, &[]).unwrap_err(),
            DatasetError::Npy {
                problem: NpyProblem::DataLength { .. },
                ..
            }
        ));
        let missing_folder = dir.path().join("no/such/folder/w.npy");
        assert!(matches!(
            write_npy(&missing_folder, 1, 1, &[1.0]).unwrap_err(),
            DatasetError::Io { .. }
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
