//! The append-only log of the leased ledger's stored answers (replay records), with its
//! in-memory index.
//!
//! # Why a log
//!
//! Stored answers are written once, read only by retries, and deleted by age. Kept in a redb
//! table keyed by pseudonym and request id, each one cost a copy-on-write of a random B-tree
//! leaf (pseudonyms are uniformly random), which made the leased ledger's writer thread spend
//! tens of microseconds of CPU per answer. Here an answer is appended to the end of a segment
//! file (a memory copy, one `write` per batch), and a lookup goes through an index in memory.
//!
//! # Files
//!
//! The log lives in a directory next to the database file (`state.redb` -> `state.redb.answers/`).
//! It is a sequence of *segments* `NNNNNNNNNN.seg` (a sequence number); only the newest one is
//! appended to. A segment starts with the 8 bytes [`SEGMENT_MAGIC`], then records:
//!
//! ```text
//! body length u32 | !body length u32 | xxh3-64 of the body u64 | body
//! body: charged_at_ms u64 | rho u64 | key length u16 | key (pseudonym ++ request id) | answer
//! ```
//!
//! All integers are little-endian. A segment is *sealed* (fsynced, never written again) when it
//! reaches [`SEGMENT_BYTES`] or has been open for [`SEGMENT_AGE`]; the next one is started.
//! The file `pruned` holds the cutoffs of earlier prunings (see Retention).
//!
//! # Durability
//!
//! The ledger's writer thread appends a batch with one `write` and fsyncs the segment on the
//! cadence it fsyncs the database (`answer_interval`): the same contract as when the answers
//! were in the database (see "Stored answers" on [`LeasedLedger`](crate::LeasedLedger)). A
//! written answer is readable at once (the index points at it; reads go through the page
//! cache), durable after the next fsync.
//!
//! # Recovery rule (on open)
//!
//! Every segment is scanned from the start; the index is rebuilt from the records found.
//! - A record whose length check fails (`!length` does not match) or that runs past the end
//!   of the file ends its segment: in the **newest** segment this is the torn tail of a write
//!   that a crash interrupted, and the file is truncated there; in an older (sealed) segment,
//!   which was fsynced before the next was started, it is damage: the rest of that segment is
//!   skipped (not deleted).
//! - A record whose length is sound but whose checksum fails (or whose body does not decode)
//!   is skipped alone, and scanning goes on after it.
//!
//! Nothing is refused: every skipped or truncated byte is counted in [`LogRecovery`] (the
//! server logs it). A lost record only costs idempotency: a retry of that request is charged
//! again as a new request (its first charge stays counted in the durable spent; never a
//! refund).
//!
//! # Retention
//!
//! Pruning (automatic with the ledger's `retention`, or [`BudgetLedger::prune`]) has the same
//! meaning as for answers in the database: answers charged strictly before the cutoff are no
//! longer found, and a retry of one is charged again. Entries leave the index at once; a
//! sealed segment whose entries are all gone is deleted (disk space is given back by whole
//! segments). So that pruned answers still on disk (in a segment that also holds newer ones)
//! do not come back after a restart, each pruning's cutoff and the log's end at that moment
//! are kept in `pruned`; the scan skips a record written before such an end and charged before
//! its cutoff.
//!
//! # Memory
//!
//! The index holds 8 bytes of key hash and 24 bytes of location per stored answer (plus hash
//! table overhead), and the writer 8 bytes per answer per segment for pruning: about 50 bytes
//! per stored answer, for as long as answers are retained, and at most
//! [`LeaseOptions::max_stored_answers`](crate::LeaseOptions::max_stored_answers) of them: the
//! leased ledger then prunes the oldest whole segments early (segments are also sealed at an
//! eighth of that bound, which is the granularity of that pruning).
//!
//! [`BudgetLedger::prune`]: crate::BudgetLedger::prune

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::error::StateError;
use crate::ledger::RequestRecord;

/// The first bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"FRANSW01";

/// A segment is sealed once it holds this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;

/// ... or once it has been open for appending this long (so that retention frees disk space
/// even at low rates).
pub(crate) const SEGMENT_AGE: Duration = Duration::from_secs(3600);

/// Bytes of a record header.
const HEADER_BYTES: usize = 16;

/// Bytes of a body before the key.
const BODY_FIXED_BYTES: usize = 18;

/// The segment number of answers that are in the database's `ledger_answers` table (stored
/// by older versions, or by the per-charge ledger), indexed here so that a lookup knows
/// without a read whether a key may be stored.
const IN_DATABASE: u32 = u32::MAX;

/// Index shards (a power of two).
const SHARDS: usize = 64;

/// The name of the file with the prunings' cutoffs.
const PRUNED_FILE: &str = "pruned";

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRecovery {
    /// Segments scanned.
    pub segments: u64,
    /// Answers indexed.
    pub answers: u64,
    /// Records skipped because their checksum failed (their requests are charged again if
    /// retried).
    pub corrupt_records: u64,
    /// Bytes cut from the end of the newest segment (a torn write).
    pub truncated_bytes: u64,
    /// Bytes skipped at the end of older segments after a damaged record length.
    pub skipped_bytes: u64,
    /// Answers found in the database table (`ledger_answers`, written by older versions or
    /// by the per-charge ledger): indexed too, and read from the database on a retry.
    pub database_answers: u64,
    /// What was found, one line each (empty when the log was clean).
    pub messages: Vec<String>,
}

/// Where an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    segment: u32,
    /// Offset of the record header.
    offset: u64,
    /// Body length.
    length: u32,
    charged_at_ms: u64,
}

/// The writer's bookkeeping of one segment.
#[derive(Debug, Default)]
struct SegmentMeta {
    /// Key hashes of the records written to it (for pruning).
    hashes: Vec<u64>,
    /// Index entries still pointing into it.
    live: u64,
    /// No live entry was charged before this (a lower bound; tightened by pruning).
    min_charged_ms: u64,
}

/// The appending side, used by the ledger's writer thread only.
#[derive(Debug)]
struct Appender {
    segment: u32,
    file: Arc<File>,
    /// Bytes in the segment.
    size: u64,
    opened: Instant,
    /// Written since the last fsync.
    dirty: bool,
    metas: BTreeMap<u32, SegmentMeta>,
    /// `(cutoff, segment, offset)` of earlier prunings, none dominated by another.
    pruned: Vec<(u64, u32, u64)>,
    /// Encoding buffer, reused.
    buffer: Vec<u8>,
    /// A segment is also sealed once it holds this many records (see
    /// [`AnswerLog::limit_segment_records`]).
    segment_records: usize,
}

/// Where the answer of a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Read from the log.
    Found(RequestRecord),
    /// Not stored.
    Absent,
    /// In the database's `ledger_answers` table: read it there.
    InDatabase,
}

/// The answer log: segment files and the index in memory.
#[derive(Debug)]
pub(crate) struct AnswerLog {
    dir: PathBuf,
    index: Vec<Mutex<HashMap<u64, Location>>>,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    appender: Mutex<Appender>,
}

/// The hash a record is indexed by: XXH3-64 of `pseudonym ++ request id`. Two keys with one
/// hash are told apart on read (the record holds its key); the later one then hides the
/// earlier one, whose retry is charged again (safe: a charge is never refunded).
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The log directory of the database file `database`.
pub(crate) fn log_dir(database: &Path) -> PathBuf {
    let mut name = database
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".answers");
    database.with_file_name(name)
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}.seg"))
}

/// Appends the record of `key` to `out`.
fn encode_record(out: &mut Vec<u8>, key: &[u8], record: &RequestRecord) {
    let body_length = BODY_FIXED_BYTES + key.len() + record.answer.len();
    let length = u32::try_from(body_length).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(!length).to_le_bytes());
    let checksum_at = out.len();
    out.extend_from_slice(&[0; 8]);
    let body_at = out.len();
    out.extend_from_slice(&record.charged_at_ms.to_le_bytes());
    out.extend_from_slice(&record.rho.to_le_bytes());
    out.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&record.answer);
    let checksum = xxh3_64(&out[body_at..]);
    out[checksum_at..body_at].copy_from_slice(&checksum.to_le_bytes());
}

/// A decoded body: `(key, record)`.
fn decode_body(body: &[u8]) -> Option<(&[u8], RequestRecord)> {
    let fixed = body.get(..BODY_FIXED_BYTES)?;
    let charged_at_ms = u64::from_le_bytes(fixed[0..8].try_into().ok()?);
    let rho = u64::from_le_bytes(fixed[8..16].try_into().ok()?);
    let key_length = usize::from(u16::from_le_bytes(fixed[16..18].try_into().ok()?));
    let rest = &body[BODY_FIXED_BYTES..];
    let (key, answer) = rest.split_at_checked(key_length)?;
    if key.len() < 32 {
        return None;
    }
    Some((
        key,
        RequestRecord {
            charged_at_ms,
            rho,
            answer: answer.to_vec(),
        },
    ))
}

/// What a header at the start of `bytes` says.
enum Header {
    /// Fewer bytes than a header, a failed length check, or a body past the end.
    Broken,
    /// A body of this length with this checksum.
    Sound { length: usize, checksum: u64 },
}

fn read_header(bytes: &[u8]) -> Header {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Header::Broken;
    };
    let word = |range: std::ops::Range<usize>| {
        u32::from_le_bytes(header[range].try_into().unwrap_or_default())
    };
    let (length, check) = (word(0..4), word(4..8));
    let checksum = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let length = length as usize;
    if check != !(length as u32) || bytes.len() - HEADER_BYTES < length {
        return Header::Broken;
    }
    Header::Sound { length, checksum }
}

/// Reads `buffer.len()` bytes at `offset`.
fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt as _;
        file.read_exact_at(buffer, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt as _;
        let mut done = 0;
        while done < buffer.len() {
            let read = file.seek_read(&mut buffer[done..], offset + done as u64)?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += read;
        }
        Ok(())
    }
}

/// Whether a record at `(segment, offset)` charged at `charged_at_ms` was pruned.
fn is_pruned(pruned: &[(u64, u32, u64)], segment: u32, offset: u64, charged_at_ms: u64) -> bool {
    pruned.iter().any(|&(cutoff, end_segment, end_offset)| {
        charged_at_ms < cutoff && (segment, offset) < (end_segment, end_offset)
    })
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, StateError> {
    mutex.lock().map_err(|_| StateError::WriterStopped)
}

impl SegmentMeta {
    fn empty() -> Self {
        Self {
            min_charged_ms: u64::MAX,
            ..Self::default()
        }
    }
}

impl AnswerLog {
    /// Opens (or creates) the log in `dir`: scans every segment, repairs a torn tail and
    /// rebuilds the index (see the module's recovery rule).
    pub(crate) fn open(dir: &Path) -> Result<(AnswerLog, LogRecovery), StateError> {
        let io =
            |operation: &'static str, path: &Path, error: std::io::Error| StateError::Storage {
                path: path.to_path_buf(),
                operation,
                reason: error.to_string(),
            };
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .map_err(|error| io("create the answer log directory", dir, error))?;
        let mut recovery = LogRecovery::default();
        let pruned = read_pruned(dir, &mut recovery);
        let mut segments: Vec<u32> = fs::read_dir(dir)
            .map_err(|error| io("list the answer log", dir, error))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".seg")?.parse::<u32>().ok()
            })
            .collect();
        segments.sort_unstable();
        let mut index: HashMap<u64, Location> = HashMap::new();
        let mut metas: BTreeMap<u32, SegmentMeta> = BTreeMap::new();
        let mut files = BTreeMap::new();
        let newest = segments.last().copied();
        let mut newest_size = 0;
        for &segment in &segments {
            let path = segment_path(dir, segment);
            let bytes =
                fs::read(&path).map_err(|error| io("read an answer segment", &path, error))?;
            recovery.segments += 1;
            let is_newest = Some(segment) == newest;
            let mut meta = SegmentMeta::empty();
            let mut end = bytes.len();
            if !bytes.starts_with(&SEGMENT_MAGIC) {
                if is_newest && bytes.len() < SEGMENT_MAGIC.len() {
                    // A segment whose header write was torn: start it again.
                    end = 0;
                } else {
                    recovery.skipped_bytes += bytes.len() as u64;
                    recovery.messages.push(format!(
                        "{}: not an answer segment (bad magic), skipped",
                        path.display()
                    ));
                    continue;
                }
            } else {
                let mut offset = SEGMENT_MAGIC.len();
                while offset < bytes.len() {
                    let Header::Sound { length, checksum } = read_header(&bytes[offset..]) else {
                        let rest = (bytes.len() - offset) as u64;
                        if is_newest {
                            recovery.truncated_bytes += rest;
                            recovery.messages.push(format!(
                                "{}: torn record at byte {offset}, truncated {rest} bytes",
                                path.display()
                            ));
                            end = offset;
                        } else {
                            recovery.skipped_bytes += rest;
                            recovery.messages.push(format!(
                                "{}: damaged record length at byte {offset}, skipped the \
                                 remaining {rest} bytes of this sealed segment",
                                path.display()
                            ));
                        }
                        break;
                    };
                    let body = &bytes[offset + HEADER_BYTES..offset + HEADER_BYTES + length];
                    let decoded = (xxh3_64(body) == checksum)
                        .then(|| decode_body(body))
                        .flatten();
                    match decoded {
                        Some((key, record)) => {
                            let location = Location {
                                segment,
                                offset: offset as u64,
                                length: length as u32,
                                charged_at_ms: record.charged_at_ms,
                            };
                            if !is_pruned(&pruned, segment, offset as u64, record.charged_at_ms) {
                                let hash = key_hash(key);
                                if let Some(old) = index.insert(hash, location)
                                    && let Some(old_meta) = metas.get_mut(&old.segment)
                                {
                                    old_meta.live = old_meta.live.saturating_sub(1);
                                }
                                meta.hashes.push(hash);
                                meta.live += 1;
                                meta.min_charged_ms = meta.min_charged_ms.min(record.charged_at_ms);
                            }
                        }
                        None => {
                            recovery.corrupt_records += 1;
                            recovery.messages.push(format!(
                                "{}: corrupt record at byte {offset} ({length} bytes), skipped",
                                path.display()
                            ));
                        }
                    }
                    offset += HEADER_BYTES + length;
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|error| io("open an answer segment", &path, error))?;
            if is_newest {
                if end < bytes.len() {
                    file.set_len(end as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(|error| io("truncate a torn answer segment", &path, error))?;
                }
                if end == 0 {
                    (&file)
                        .write_all(&SEGMENT_MAGIC)
                        .and_then(|()| file.sync_data())
                        .map_err(|error| io("write an answer segment", &path, error))?;
                    end = SEGMENT_MAGIC.len();
                }
                newest_size = end as u64;
            }
            files.insert(segment, Arc::new(file));
            metas.insert(segment, meta);
        }
        recovery.answers = index.len() as u64;
        let mut shards: Vec<HashMap<u64, Location>> = (0..SHARDS).map(|_| HashMap::new()).collect();
        for (hash, location) in index {
            shards[(hash as usize) % SHARDS].insert(hash, location);
        }
        // Append to the newest segment unless it is full; else start the next one.
        let (segment, file, size) = match newest {
            Some(segment) if newest_size < SEGMENT_BYTES && files.contains_key(&segment) => {
                let file = files
                    .get(&segment)
                    .cloned()
                    .ok_or(StateError::WriterStopped)?;
                (segment, file, newest_size)
            }
            newest => {
                let segment = newest.map_or(1, |segment| segment.saturating_add(1));
                let file = Arc::new(create_segment(dir, segment)?);
                files.insert(segment, Arc::clone(&file));
                metas.insert(segment, SegmentMeta::empty());
                (segment, file, SEGMENT_MAGIC.len() as u64)
            }
        };
        let log = AnswerLog {
            dir: dir.to_path_buf(),
            index: shards.into_iter().map(Mutex::new).collect(),
            files: RwLock::new(files),
            appender: Mutex::new(Appender {
                segment,
                file,
                size,
                opened: Instant::now(),
                dirty: false,
                metas,
                pruned,
                buffer: Vec::new(),
                segment_records: usize::MAX,
            }),
        };
        Ok((log, recovery))
    }

    fn io_error(&self, operation: &'static str, error: std::io::Error) -> StateError {
        StateError::Storage {
            path: self.dir.clone(),
            operation,
            reason: error.to_string(),
        }
    }

    /// Starts segment `segment` and makes it the one appended to.
    fn start_segment(&self, appender: &mut Appender, segment: u32) -> Result<(), StateError> {
        let file = Arc::new(create_segment(&self.dir, segment)?);
        self.files
            .write()
            .map_err(|_| StateError::WriterStopped)?
            .insert(segment, Arc::clone(&file));
        appender.metas.insert(segment, SegmentMeta::empty());
        appender.segment = segment;
        appender.file = file;
        appender.size = SEGMENT_MAGIC.len() as u64;
        appender.opened = Instant::now();
        appender.dirty = true;
        Ok(())
    }

    /// Appends `answers` (`(key, record)`) with one write and indexes them; they are readable
    /// when this returns, durable after the next [`AnswerLog::sync`]. On an error nothing was
    /// indexed and the segment is cut back to where it was.
    pub(crate) fn append<'a>(
        &self,
        answers: impl Iterator<Item = (&'a [u8], &'a RequestRecord)>,
    ) -> Result<(), StateError> {
        let mut appender = lock(&self.appender)?;
        let records = appender
            .metas
            .get(&appender.segment)
            .map_or(0, |meta| meta.hashes.len());
        if appender.size >= SEGMENT_BYTES
            || appender.opened.elapsed() >= SEGMENT_AGE
            || records >= appender.segment_records
        {
            // Seal the full segment (fsynced before the next one starts).
            appender
                .file
                .sync_data()
                .map_err(|error| self.io_error("seal an answer segment", error))?;
            let next = appender.segment.saturating_add(1);
            self.start_segment(&mut appender, next)?;
        }
        let appender = &mut *appender;
        let mut buffer = std::mem::take(&mut appender.buffer);
        buffer.clear();
        // (hash, offset in the segment, body length, charged at)
        let mut placed: Vec<(u64, u64, u32, u64)> = Vec::new();
        for (key, record) in answers {
            let at = buffer.len();
            encode_record(&mut buffer, key, record);
            let length = (buffer.len() - at - HEADER_BYTES) as u32;
            placed.push((
                key_hash(key),
                appender.size + at as u64,
                length,
                record.charged_at_ms,
            ));
        }
        if buffer.is_empty() {
            appender.buffer = buffer;
            return Ok(());
        }
        if let Err(error) = (&*appender.file).write_all(&buffer) {
            // Drop a partial write so that the segment stays well formed.
            let _ = appender.file.set_len(appender.size);
            appender.buffer = buffer;
            return Err(self.io_error("append answers", error));
        }
        appender.size += buffer.len() as u64;
        appender.dirty = true;
        appender.buffer = buffer;
        let segment = appender.segment;
        for (hash, offset, length, charged_at_ms) in placed {
            let location = Location {
                segment,
                offset,
                length,
                charged_at_ms,
            };
            let old = lock(&self.index[(hash as usize) % SHARDS])?.insert(hash, location);
            if let Some(old) = old
                && let Some(meta) = appender.metas.get_mut(&old.segment)
            {
                meta.live = meta.live.saturating_sub(1);
            }
            if let Some(meta) = appender.metas.get_mut(&segment) {
                meta.hashes.push(hash);
                meta.live += 1;
                meta.min_charged_ms = meta.min_charged_ms.min(charged_at_ms);
            }
        }
        Ok(())
    }

    /// Fsyncs what was appended since the last sync.
    pub(crate) fn sync(&self) -> Result<(), StateError> {
        let mut appender = lock(&self.appender)?;
        if appender.dirty {
            appender
                .file
                .sync_data()
                .map_err(|error| self.io_error("fsync the answer log", error))?;
            appender.dirty = false;
        }
        Ok(())
    }

    /// Whether an answer with this key hash may be stored (no false negatives).
    pub(crate) fn may_contain(&self, hash: u64) -> bool {
        self.index[(hash as usize) % SHARDS]
            .lock()
            .map_or(true, |shard| shard.contains_key(&hash))
    }

    /// Indexes an answer stored in the database table (`key`, charged at `charged_at_ms`)
    /// unless the log holds one for the key.
    pub(crate) fn index_in_database(
        &self,
        key: &[u8],
        charged_at_ms: u64,
    ) -> Result<(), StateError> {
        let hash = key_hash(key);
        let mut appender = lock(&self.appender)?;
        let mut shard = lock(&self.index[(hash as usize) % SHARDS])?;
        if shard.contains_key(&hash) {
            return Ok(());
        }
        shard.insert(
            hash,
            Location {
                segment: IN_DATABASE,
                offset: 0,
                length: 0,
                charged_at_ms,
            },
        );
        let meta = appender
            .metas
            .entry(IN_DATABASE)
            .or_insert_with(SegmentMeta::empty);
        meta.hashes.push(hash);
        meta.live += 1;
        meta.min_charged_ms = meta.min_charged_ms.min(charged_at_ms);
        Ok(())
    }

    /// The stored answer of `key` (`pseudonym ++ request id`), read from its segment.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<RequestRecord>, StateError> {
        match self.lookup(key)? {
            Lookup::Found(record) => Ok(Some(record)),
            Lookup::Absent | Lookup::InDatabase => Ok(None),
        }
    }

    /// Where the stored answer of `key` is (`pseudonym ++ request id`); an answer in the log
    /// is read from its segment.
    pub(crate) fn lookup(&self, key: &[u8]) -> Result<Lookup, StateError> {
        let hash = key_hash(key);
        let Some(location) = lock(&self.index[(hash as usize) % SHARDS])?
            .get(&hash)
            .copied()
        else {
            return Ok(Lookup::Absent);
        };
        if location.segment == IN_DATABASE {
            return Ok(Lookup::InDatabase);
        }
        let file = self
            .files
            .read()
            .map_err(|_| StateError::WriterStopped)?
            .get(&location.segment)
            .cloned();
        // A segment deleted meanwhile was pruned: the answer is gone.
        let Some(file) = file else {
            return Ok(Lookup::Absent);
        };
        let mut bytes = vec![0; HEADER_BYTES + location.length as usize];
        read_at(&file, &mut bytes, location.offset)
            .map_err(|error| self.io_error("read a stored answer", error))?;
        let corrupt = |reason: &str| StateError::CorruptRecord {
            path: segment_path(&self.dir, location.segment),
            record: "stored answer",
            reason: format!("at byte {}: {reason}", location.offset),
        };
        let Header::Sound { length, checksum } = read_header(&bytes) else {
            return Err(corrupt("bad length"));
        };
        let body = &bytes[HEADER_BYTES..HEADER_BYTES + length];
        if xxh3_64(body) != checksum {
            return Err(corrupt("checksum mismatch"));
        }
        let (stored_key, record) = decode_body(body).ok_or_else(|| corrupt("bad body"))?;
        // Another key with the same hash: this one is not stored.
        Ok(if stored_key == key {
            Lookup::Found(record)
        } else {
            Lookup::Absent
        })
    }

    /// Seals a segment once it holds `records` records too (at least 1), so that a bound on
    /// the index can be kept by dropping whole segments at that granularity.
    pub(crate) fn limit_segment_records(&self, records: usize) -> Result<(), StateError> {
        lock(&self.appender)?.segment_records = records.max(1);
        Ok(())
    }

    /// Answers in the index (in the log and in the database table).
    #[cfg(test)]
    pub(crate) fn indexed(&self) -> Result<u64, StateError> {
        let appender = lock(&self.appender)?;
        Ok(appender.metas.values().map(|meta| meta.live).sum())
    }

    /// The pruning cutoff that brings the index down to at most `keep` answers by dropping
    /// the oldest answers whole segments at a time (the database table's answers, written
    /// by older versions, count as the oldest): the earliest charge time still indexed in the
    /// oldest segment that is kept. `None` when the index fits, or when only the segment
    /// being written would be left (it is sealed at [`AnswerLog::limit_segment_records`]).
    pub(crate) fn cutoff_to_keep(&self, keep: u64) -> Result<Option<u64>, StateError> {
        let appender = lock(&self.appender)?;
        let mut left: u64 = appender.metas.values().map(|meta| meta.live).sum();
        if left <= keep {
            return Ok(None);
        }
        let oldest_first = appender
            .metas
            .get_key_value(&IN_DATABASE)
            .into_iter()
            .chain(appender.metas.range(..IN_DATABASE));
        for (&segment, meta) in oldest_first {
            if meta.live == 0 {
                continue;
            }
            if left <= keep {
                return Ok(Some(meta.min_charged_ms));
            }
            if segment == appender.segment {
                break;
            }
            left -= meta.live;
        }
        Ok(None)
    }

    /// Forgets up to `limit` answers charged before `cutoff_ms` and deletes the sealed
    /// segments left without answers; remembers the cutoff for later opens. Returns how many
    /// answers of the log it forgot (answers in the database table leave the index too, but
    /// are deleted and counted by the caller's pruning of the table).
    pub(crate) fn prune(&self, cutoff_ms: u64, limit: usize) -> Result<u64, StateError> {
        let mut appender = lock(&self.appender)?;
        let appender = &mut *appender;
        let end = (appender.segment, appender.size);
        let mut removed = 0_u64;
        let mut steps = 0_usize;
        let mut emptied = Vec::new();
        for (&segment, meta) in &mut appender.metas {
            if meta.min_charged_ms >= cutoff_ms {
                continue;
            }
            let mut min_left = u64::MAX;
            let mut complete = true;
            for &hash in &meta.hashes {
                let mut shard = lock(&self.index[(hash as usize) % SHARDS])?;
                let Some(location) = shard.get(&hash).copied() else {
                    continue;
                };
                if location.segment != segment {
                    continue;
                }
                if location.charged_at_ms < cutoff_ms {
                    if steps >= limit {
                        complete = false;
                        break;
                    }
                    shard.remove(&hash);
                    meta.live = meta.live.saturating_sub(1);
                    steps += 1;
                    // Rows of the database table are deleted (and counted) by the caller.
                    if segment != IN_DATABASE {
                        removed += 1;
                    }
                } else {
                    min_left = min_left.min(location.charged_at_ms);
                }
            }
            if complete {
                meta.min_charged_ms = min_left;
            }
            if meta.live == 0 && segment != appender.segment && segment != IN_DATABASE {
                emptied.push(segment);
            }
            if !complete {
                break;
            }
        }
        if removed > 0 {
            // Remember the cutoff before the files go (a crash in between only keeps more).
            appender.pruned.retain(|&(cutoff, segment, offset)| {
                !(cutoff <= cutoff_ms && (segment, offset) <= end)
            });
            appender.pruned.push((cutoff_ms, end.0, end.1));
            write_pruned(&self.dir, &appender.pruned)
                .map_err(|error| self.io_error("record a pruning of the answer log", error))?;
        }
        for segment in emptied {
            appender.metas.remove(&segment);
            self.files
                .write()
                .map_err(|_| StateError::WriterStopped)?
                .remove(&segment);
            fs::remove_file(segment_path(&self.dir, segment))
                .map_err(|error| self.io_error("delete a pruned answer segment", error))?;
        }
        Ok(removed)
    }

    /// Segment files on disk (tests).
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.files.read().map_or(0, |files| files.len())
    }

    /// Starts a new segment now (tests: retention works on whole segments).
    #[cfg(test)]
    pub(crate) fn seal(&self) -> Result<(), StateError> {
        let mut appender = lock(&self.appender)?;
        appender
            .file
            .sync_data()
            .map_err(|error| self.io_error("seal an answer segment", error))?;
        let next = appender.segment.saturating_add(1);
        self.start_segment(&mut appender, next)
    }

    /// The segment file appended to (tests).
    #[cfg(test)]
    pub(crate) fn active_segment_path(&self) -> PathBuf {
        let segment = self.appender.lock().map_or(0, |appender| appender.segment);
        segment_path(&self.dir, segment)
    }
}

/// Creates segment file `segment` with its magic (and makes its name durable).
fn create_segment(dir: &Path, segment: u32) -> Result<File, StateError> {
    let path = segment_path(dir, segment);
    let io = |error: std::io::Error| StateError::Storage {
        path: path.clone(),
        operation: "create an answer segment",
        reason: error.to_string(),
    };
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    file.set_len(0).map_err(io)?;
    (&file).write_all(&SEGMENT_MAGIC).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// `pruned`: a count `u32`, then `(cutoff u64, segment u32, offset u64)` each, then the
/// XXH3-64 of everything before it.
fn write_pruned(dir: &Path, pruned: &[(u64, u32, u64)]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(12 + 20 * pruned.len());
    bytes.extend_from_slice(
        &u32::try_from(pruned.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for &(cutoff, segment, offset) in pruned {
        bytes.extend_from_slice(&cutoff.to_le_bytes());
        bytes.extend_from_slice(&segment.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
    }
    let checksum = xxh3_64(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    let temporary = dir.join(format!("{PRUNED_FILE}.tmp"));
    {
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, dir.join(PRUNED_FILE))?;
    sync_dir(dir)
}

/// The prunings recorded in `pruned`; an unreadable file is reported and ignored (pruned
/// answers may then be found again: they replay, which costs nothing).
fn read_pruned(dir: &Path, recovery: &mut LogRecovery) -> Vec<(u64, u32, u64)> {
    let path = dir.join(PRUNED_FILE);
    let Ok(bytes) = fs::read(&path) else {
        return Vec::new();
    };
    let parsed = (|| {
        let (body, checksum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
        if xxh3_64(body) != u64::from_le_bytes(checksum.try_into().ok()?) {
            return None;
        }
        let count = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let entries = body.get(4..)?;
        if entries.len() != count.checked_mul(20)? {
            return None;
        }
        Some(
            entries
                .chunks_exact(20)
                .map(|entry| {
                    let cutoff = u64::from_le_bytes(entry[0..8].try_into().unwrap_or_default());
                    let segment = u32::from_le_bytes(entry[8..12].try_into().unwrap_or_default());
                    let offset = u64::from_le_bytes(entry[12..20].try_into().unwrap_or_default());
                    (cutoff, segment, offset)
                })
                .collect(),
        )
    })();
    parsed.unwrap_or_else(|| {
        recovery.messages.push(format!(
            "{}: unreadable, ignored (answers pruned before may be found again)",
            path.display()
        ));
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(who: u8, id: &str) -> Vec<u8> {
        let mut key = vec![who; 32];
        key.extend_from_slice(id.as_bytes());
        key
    }

    fn record(at: u64, answer: &str) -> RequestRecord {
        RequestRecord {
            charged_at_ms: at,
            rho: 7,
            answer: answer.as_bytes().to_vec(),
        }
    }

    fn append(log: &AnswerLog, entries: &[(Vec<u8>, RequestRecord)]) {
        log.append(entries.iter().map(|(key, record)| (key.as_slice(), record)))
            .unwrap();
    }

    fn answer(log: &AnswerLog, key: &[u8]) -> Option<Vec<u8>> {
        log.get(key).unwrap().map(|record| record.answer)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever happens to the segment files (bytes overwritten anywhere, a file cut
        /// short), the log opens, and every answer it finds is exactly the one written for
        /// that key; an undamaged log finds them all.
        #[test]
        fn a_damaged_log_opens_and_never_returns_a_wrong_answer(
            records in 1_usize..40,
            seal_every in 1_usize..15,
            flips in proptest::collection::vec(
                (
                    proptest::prelude::any::<proptest::sample::Index>(),
                    proptest::prelude::any::<proptest::sample::Index>(),
                    proptest::prelude::any::<u8>(),
                ),
                0..6,
            ),
            cut in proptest::option::of((
                proptest::prelude::any::<proptest::sample::Index>(),
                proptest::prelude::any::<proptest::sample::Index>(),
            )),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let written: Vec<(Vec<u8>, RequestRecord)> = (0..records)
                .map(|i| {
                    let answer = format!("answer {i} {}", "x".repeat(i % 13));
                    (key((i % 7) as u8, &format!("id{i}")), record(i as u64, &answer))
                })
                .collect();
            {
                let (log, _) = AnswerLog::open(dir.path()).unwrap();
                for (i, entry) in written.iter().enumerate() {
                    append(&log, std::slice::from_ref(entry));
                    if (i + 1) % seal_every == 0 {
                        log.seal().unwrap();
                    }
                }
                log.sync().unwrap();
            }
            let mut files: Vec<PathBuf> = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
                .collect();
            files.sort();
            let damaged = !flips.is_empty() || cut.is_some();
            for (file, at, byte) in &flips {
                let path = &files[file.index(files.len())];
                let mut bytes = fs::read(path).unwrap();
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] ^= byte | 1;
                    fs::write(path, &bytes).unwrap();
                }
            }
            if let Some((file, at)) = cut {
                let path = &files[file.index(files.len())];
                let len = fs::metadata(path).unwrap().len() as usize;
                let file = fs::OpenOptions::new().write(true).open(path).unwrap();
                file.set_len(at.index(len + 1) as u64).unwrap();
            }
            let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
            for (key, record) in &written {
                match log.get(key).unwrap() {
                    Some(found) => proptest::prop_assert_eq!(&found, record),
                    None => proptest::prop_assert!(damaged, "an undamaged log lost an answer: {recovery:?}"),
                }
            }
            // Appending after the repair works and is found.
            let late = (key(9, "late"), record(1_000, "late answer"));
            append(&log, std::slice::from_ref(&late));
            proptest::prop_assert_eq!(answer(&log, &late.0), Some(b"late answer".to_vec()));
        }
    }

    #[test]
    fn cutoff_to_keep_drops_the_oldest_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AnswerLog::open(dir.path()).unwrap();
        log.limit_segment_records(3).unwrap();
        // Segments of 3 records each, charged at 0..12 in order: [0,1,2] [3,4,5] [6,7,8]
        // [9,10,11] (the last one being written).
        for at in 0..12_u64 {
            append(&log, &[(key(1, &format!("k{at}")), record(at, "x"))]);
        }
        assert_eq!(log.segment_count(), 4);
        assert_eq!(log.indexed().unwrap(), 12);
        assert_eq!(log.cutoff_to_keep(12).unwrap(), None);
        // Keeping 7 keeps the last two segments (6 answers): prune before 6.
        assert_eq!(log.cutoff_to_keep(7).unwrap(), Some(6));
        assert_eq!(log.cutoff_to_keep(6).unwrap(), Some(6));
        assert_eq!(log.cutoff_to_keep(5).unwrap(), Some(9));
        // Only the segment being written would be left: nothing to drop whole.
        assert_eq!(log.cutoff_to_keep(2).unwrap(), None);
        assert_eq!(log.prune(6, usize::MAX).unwrap(), 6);
        assert_eq!(log.indexed().unwrap(), 6);
        assert_eq!(log.segment_count(), 2);
        assert_eq!(answer(&log, &key(1, "k5")), None);
        assert_eq!(answer(&log, &key(1, "k6")), Some(b"x".to_vec()));
        assert_eq!(log.cutoff_to_keep(6).unwrap(), None);
    }

    #[test]
    fn answers_survive_a_reopen_and_unknown_keys_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
            assert_eq!(
                recovery,
                LogRecovery {
                    segments: 0,
                    ..LogRecovery::default()
                }
            );
            append(
                &log,
                &[(key(1, "a"), record(5, "A")), (key(2, "a"), record(6, "B"))],
            );
            log.sync().unwrap();
            assert_eq!(answer(&log, &key(1, "a")), Some(b"A".to_vec()));
            assert!(!log.may_contain(key_hash(&key(1, "b"))));
        }
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!((recovery.answers, recovery.messages.len()), (2, 0));
        assert_eq!(answer(&log, &key(2, "a")), Some(b"B".to_vec()));
        assert_eq!(log.get(&key(1, "b")).unwrap(), None);
        let stored = log.get(&key(1, "a")).unwrap().unwrap();
        assert_eq!((stored.charged_at_ms, stored.rho), (5, 7));
    }

    #[test]
    fn a_torn_tail_is_truncated_and_appending_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (log, _) = AnswerLog::open(dir.path()).unwrap();
            append(&log, &[(key(1, "kept"), record(1, "K"))]);
            append(&log, &[(key(1, "torn"), record(2, "a longer answer"))]);
            log.active_segment_path()
        };
        // Cut the second record in the middle (a write the crash interrupted).
        let length = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(length - 5)
            .unwrap();
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(recovery.answers, 1);
        assert!(recovery.truncated_bytes > 0, "{recovery:?}");
        assert_eq!(recovery.messages.len(), 1, "{recovery:?}");
        assert_eq!(answer(&log, &key(1, "kept")), Some(b"K".to_vec()));
        assert_eq!(answer(&log, &key(1, "torn")), None);
        append(&log, &[(key(1, "after"), record(3, "N"))]);
        drop(log);
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(
            (recovery.answers, recovery.messages.len()),
            (2, 0),
            "{recovery:?}"
        );
        assert_eq!(answer(&log, &key(1, "after")), Some(b"N".to_vec()));
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_skipped_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (log, _) = AnswerLog::open(dir.path()).unwrap();
            for (index, id) in ["first", "middle", "last"].into_iter().enumerate() {
                append(&log, &[(key(3, id), record(index as u64, id))]);
            }
            log.active_segment_path()
        };
        // Flip a byte of the middle record's answer (its length stays sound).
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes
            .windows(6)
            .position(|window| window == b"middle")
            .unwrap();
        let at = at
            + 6
            + bytes[at + 6..]
                .windows(6)
                .position(|w| w == b"middle")
                .unwrap();
        bytes[at] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(
            (
                recovery.answers,
                recovery.corrupt_records,
                recovery.truncated_bytes
            ),
            (2, 1, 0),
            "{recovery:?}"
        );
        assert_eq!(answer(&log, &key(3, "first")), Some(b"first".to_vec()));
        assert_eq!(answer(&log, &key(3, "middle")), None);
        assert_eq!(answer(&log, &key(3, "last")), Some(b"last".to_vec()));
    }

    #[test]
    fn a_damaged_length_in_a_sealed_segment_skips_its_rest_only() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = {
            let (log, _) = AnswerLog::open(dir.path()).unwrap();
            append(
                &log,
                &[(key(4, "a"), record(1, "a")), (key(4, "b"), record(1, "b"))],
            );
            let sealed = log.active_segment_path();
            log.seal().unwrap();
            append(&log, &[(key(4, "c"), record(2, "c"))]);
            sealed
        };
        let mut bytes = fs::read(&sealed).unwrap();
        // The second record's length check.
        let second = SEGMENT_MAGIC.len()
            + HEADER_BYTES
            + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        bytes[second + 4] ^= 0xff;
        fs::write(&sealed, &bytes).unwrap();
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(recovery.answers, 2, "{recovery:?}");
        assert!(recovery.skipped_bytes > 0 && recovery.truncated_bytes == 0);
        assert_eq!(answer(&log, &key(4, "a")), Some(b"a".to_vec()));
        assert_eq!(answer(&log, &key(4, "b")), None);
        assert_eq!(answer(&log, &key(4, "c")), Some(b"c".to_vec()));
        // The sealed segment was not cut.
        assert_eq!(fs::read(&sealed).unwrap().len(), bytes.len());
    }

    #[test]
    fn pruning_forgets_old_answers_drops_empty_segments_and_stays_pruned_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = AnswerLog::open(dir.path()).unwrap();
            append(
                &log,
                &[
                    (key(5, "old1"), record(10, "o")),
                    (key(5, "old2"), record(11, "o")),
                ],
            );
            log.seal().unwrap();
            // A segment mixing an old and a recent answer.
            append(
                &log,
                &[
                    (key(5, "old3"), record(12, "o")),
                    (key(5, "new"), record(100, "n")),
                ],
            );
            log.seal().unwrap();
            assert_eq!(log.segment_count(), 3);
            // At most one per step.
            assert_eq!(log.prune(50, 1).unwrap(), 1);
            assert_eq!(log.prune(50, usize::MAX).unwrap(), 2);
            assert_eq!(log.prune(50, usize::MAX).unwrap(), 0);
            // The first segment is gone, the mixed one stays (it holds "new").
            assert_eq!(log.segment_count(), 2);
            for id in ["old1", "old2", "old3"] {
                assert_eq!(answer(&log, &key(5, id)), None, "{id}");
            }
            assert_eq!(answer(&log, &key(5, "new")), Some(b"n".to_vec()));
            // An answer written after the pruning with an older charge time stays.
            append(&log, &[(key(5, "late"), record(20, "l"))]);
        }
        let (log, recovery) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(recovery.answers, 2, "{recovery:?}");
        assert_eq!(answer(&log, &key(5, "old3")), None);
        assert_eq!(answer(&log, &key(5, "new")), Some(b"n".to_vec()));
        assert_eq!(answer(&log, &key(5, "late")), Some(b"l".to_vec()));
    }

    #[test]
    fn a_later_answer_for_the_same_key_wins() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = AnswerLog::open(dir.path()).unwrap();
            append(&log, &[(key(6, "x"), record(1, "first"))]);
            append(&log, &[(key(6, "x"), record(2, "second"))]);
            assert_eq!(answer(&log, &key(6, "x")), Some(b"second".to_vec()));
        }
        let (log, _) = AnswerLog::open(dir.path()).unwrap();
        assert_eq!(answer(&log, &key(6, "x")), Some(b"second".to_vec()));
    }
}
