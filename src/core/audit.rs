//! Reading CloudTrail's KMS events of a volume back as the paths its users know.
//!
//! Every key call kmsfs makes names the volume (`kmsfs:volume`) and the file's *stored* path
//! (`kmsfs:path`) in its encryption context, and CloudTrail logs that context in the clear.
//! With encrypted names the stored path is ciphertext (`/Xk2…/bQ9…`), so the log alone says
//! which volume and directory depth a call was for, not which file. This module reads
//! CloudTrail input (a log file `{"Records":[...]}` as CloudTrail delivers it, gzip-compressed
//! or not, several of them concatenated, or one event per line as `jq -c` or CloudTrail Lake
//! exports give), keeps the KMS events (`eventSource` = `kms.amazonaws.com`) whose context
//! names this volume, and decodes each stored path with the volume key, one directory record
//! per directory on the way ([`super::names::NameCache`]). ReEncrypt names two contexts
//! (`sourceEncryptionContext` to `destinationEncryptionContext`); the others one
//! (`encryptionContext`). A path decodes only while the directories on its way exist: a name
//! is encrypted under its directory's id, which goes with the directory, so a file in a
//! removed (or renamed) directory shows as undecoded, with the reason and the plaintext name
//! of the deepest directory that still decodes.
//!
//! The input is untrusted text: whoever can write the log file or the pipe decides what is in
//! it, and CloudTrail itself logs whatever context a caller sent. So an event is shown as what
//! it says (an event naming this volume that kmsfs did not make is worth seeing), and a stored
//! path is believed only as far as the volume's own directory records and name key decode it:
//! it must be canonical (no `..`, nothing outside the volume), each directory's id comes from
//! its authenticated record, and a forged name shows as undecoded with the reason. Reading it
//! never panics and is bounded: the input is read once, as a stream, at most [`MAX_INPUT`]
//! bytes after decompression (a gzip bomb stops there); a line may be at most [`MAX_LINE`]
//! bytes, refused while it is read, unless it opens a `{"Records": ...` document, which
//! CloudTrail writes as one line of any length and which is parsed one event at a time,
//! keeping only the fields shown and skipping the rest unread; nesting deeper than
//! serde_json's limit is refused. The fields shown may hold any character: the command line
//! escapes control characters, and JSON output is JSON-escaped.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::names::{Listed, NameCache};
use super::volume::Volume;
use crate::error::{Error, Result};
use crate::format::context::{CanonicalPath, CONTEXT_PATH, CONTEXT_PURPOSE, CONTEXT_VOLUME};
use crate::format::names::{self as name_format, EntryName};

/// Most bytes read from the input, after decompression.
pub const MAX_INPUT: u64 = 1 << 30;
/// Longest line outside a Records document (one event of JSON Lines input).
pub const MAX_LINE: usize = 1 << 20;
/// The `eventSource` of AWS KMS events.
pub const KMS_SOURCE: &str = "kms.amazonaws.com";

/// What one side of a key call's encryption context names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// A file's stored path, and its plaintext path.
    Path { stored: String, plain: String },
    /// A stored path that does not decode, and why.
    Undecoded { stored: String, why: String },
    /// A context naming no file of this volume: what it names instead (`volume config`).
    NoPath(String),
}

impl Named {
    /// The plaintext path, where there is one.
    pub fn plain(&self) -> Option<&str> {
        match self {
            Named::Path { plain, .. } => Some(plain),
            _ => None,
        }
    }

    /// The stored path as the event gives it, where there is one.
    pub fn stored(&self) -> Option<&str> {
        match self {
            Named::Path { stored, .. } | Named::Undecoded { stored, .. } => Some(stored),
            Named::NoPath(_) => None,
        }
    }

    /// Why there is no plaintext path (None when there is one).
    pub fn why(&self) -> Option<&str> {
        match self {
            Named::Path { .. } => None,
            Named::Undecoded { why, .. } | Named::NoPath(why) => Some(why),
        }
    }

    /// Whether this is a stored path that failed to decode.
    pub fn undecoded(&self) -> bool {
        matches!(self, Named::Undecoded { .. })
    }
}

/// One KMS call on this volume, as CloudTrail logged it, with its paths decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// `eventTime`, as logged.
    pub time: Option<String>,
    /// Who called: `userIdentity.arn`, else its `principalId`, else its `type`.
    pub principal: Option<String>,
    /// `eventName`: `Decrypt`, `GenerateDataKey`, `Encrypt`, `ReEncrypt`, ...
    pub operation: String,
    /// `sourceIPAddress`.
    pub source_ip: Option<String>,
    /// `errorCode`, for a call that failed.
    pub event_error: Option<String>,
    /// What the context names (for ReEncrypt, the destination context).
    pub target: Named,
    /// ReEncrypt only: what the source context names.
    pub from: Option<Named>,
}

impl AuditEvent {
    /// Whether a stored path of this event did not decode.
    pub fn undecoded(&self) -> bool {
        self.target.undecoded() || self.from.as_ref().is_some_and(Named::undecoded)
    }
}

/// Counts of one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// KMS events whose context names this volume.
    pub events: u64,
    /// Other events: other services', other volumes', other applications' keys.
    pub skipped: u64,
    /// Events of this volume with a stored path that did not decode.
    pub undecoded: u64,
}

/// Reads CloudTrail input for one volume (see the module docs).
pub struct Auditor<'a> {
    volume: &'a Volume,
    volume_id: String,
    names: NameCache,
    summary: Summary,
}

impl<'a> Auditor<'a> {
    pub fn new(volume: &'a Volume) -> Self {
        Auditor {
            volume,
            volume_id: volume.id_hex(),
            names: NameCache::default(),
            summary: Summary::default(),
        }
    }

    /// Reads `input` (gzip-compressed or not) to its end, calling `each` with every event of
    /// this volume in input order; returns the counts. Input that is not CloudTrail JSON, or
    /// over the limits, is a usage error naming where it went wrong; what `each` returns
    /// stops the read.
    pub fn read(
        &mut self,
        input: impl Read,
        mut each: impl FnMut(&AuditEvent) -> Result<()>,
    ) -> Result<Summary> {
        let input = Bounded::new(decompressed(input)?);
        let mut stream = serde_json::Deserializer::from_reader(input).into_iter::<Document>();
        // What `each` returns is passed on as it is, not as an input error.
        for doc in &mut stream {
            for raw in doc.map_err(input_error)?.0 {
                if let Some(event) = self.event(raw) {
                    each(&event)?;
                }
            }
        }
        Ok(self.summary)
    }

    /// The event `raw` if it is a KMS call on this volume (counted either way).
    fn event(&mut self, raw: RawEvent) -> Option<AuditEvent> {
        let ours = |c: &Option<Context>| c.as_ref().is_some_and(|c| c.volume(&self.volume_id));
        let two_sided = raw.source_context.is_some() || raw.destination_context.is_some();
        let kept = raw.source.as_deref() == Some(KMS_SOURCE)
            && if two_sided {
                ours(&raw.source_context) || ours(&raw.destination_context)
            } else {
                ours(&raw.context)
            };
        if !kept {
            self.summary.skipped += 1;
            return None;
        }
        let (target, from) = if two_sided {
            (
                self.named(raw.destination_context.as_ref()),
                Some(self.named(raw.source_context.as_ref())),
            )
        } else {
            (self.named(raw.context.as_ref()), None)
        };
        let event = AuditEvent {
            time: raw.time,
            principal: raw.principal,
            operation: raw.name.unwrap_or_else(|| "?".into()),
            source_ip: raw.source_ip,
            event_error: raw.error_code,
            target,
            from,
        };
        self.summary.events += 1;
        if event.undecoded() {
            self.summary.undecoded += 1;
        }
        Some(event)
    }

    /// What one context names.
    fn named(&mut self, context: Option<&Context>) -> Named {
        let Some(context) = context else {
            return Named::NoPath("no encryption context".into());
        };
        match context.get(CONTEXT_VOLUME) {
            Some(v) if v == self.volume_id => {}
            Some(v) => return Named::NoPath(format!("volume {v}, not this one")),
            None => return Named::NoPath("not a kmsfs context".into()),
        }
        match (context.get(CONTEXT_PATH), context.get(CONTEXT_PURPOSE)) {
            (Some(stored), _) => match decode(self.volume, &mut self.names, stored) {
                Ok(plain) => Named::Path {
                    stored: stored.to_string(),
                    plain: plain.to_string(),
                },
                Err(why) => Named::Undecoded {
                    stored: stored.to_string(),
                    why,
                },
            },
            (None, Some("volume-config")) => Named::NoPath("volume config".into()),
            (None, Some(purpose)) => Named::NoPath(format!("{CONTEXT_PURPOSE} {purpose}")),
            (None, None) => Named::NoPath(format!("no {CONTEXT_PATH} in the context")),
        }
    }
}

/// The plaintext path of the stored path `stored` (as an encryption context or fsck gives
/// it), or why it has none: not a canonical stored path, a directory on its way gone, a name
/// that does not decrypt where it is.
pub fn decode(
    volume: &Volume,
    names: &mut NameCache,
    stored: &str,
) -> std::result::Result<CanonicalPath, String> {
    let path =
        CanonicalPath::from_encoded(stored).map_err(|e| format!("not a stored path: {e}"))?;
    match names.plain_path(volume, &path) {
        Ok(plain) => Ok(plain),
        Err(e) => Err(explain(volume, names, &path).unwrap_or_else(|| e.to_string())),
    }
}

/// Why `stored` does not decode, in the words of the plaintext path up to where it stops: the
/// same walk as [`NameCache::plain_path`], told.
fn explain(volume: &Volume, names: &mut NameCache, stored: &CanonicalPath) -> Option<String> {
    let mut dir = CanonicalPath::root();
    let mut plain = CanonicalPath::root();
    for name in stored.to_relative_path().iter() {
        let name = name.as_bytes();
        let id = match names.dir_id(volume, &dir) {
            Ok(id) => id,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Some(format!(
                    "directory {plain} no longer exists (removed or renamed since), and the \
                     names in it decrypt only under its id"
                ))
            }
            Err(e) => return Some(format!("directory {plain}: {e}")),
        };
        match volume.listed_name(&dir, Some(&id), name) {
            Ok(Listed::Name(n)) => plain = plain.join(&n).ok()?,
            Ok(Listed::Own) => plain = plain.join(name).ok()?,
            Ok(Listed::Foreign(why)) => {
                if name_format::classify(name) == EntryName::Long {
                    let side = dir
                        .join(name_format::side_record(std::str::from_utf8(name).ok()?).as_bytes())
                        .ok()?;
                    let gone = matches!(
                        volume.backing().open_file(&side, false, crate::backing::Atime::Keep),
                        Err(e) if e.kind() == io::ErrorKind::NotFound
                    );
                    if gone {
                        return Some(format!(
                            "a long name in {plain} whose side record is gone (removed or \
                             renamed since)"
                        ));
                    }
                }
                let hint = if dir.is_root() {
                    ""
                } else {
                    " (was the directory removed and made again since?)"
                };
                return Some(format!("in directory {plain}: {why}{hint}"));
            }
            Err(e) => return Some(e.to_string()),
        }
        dir = dir.join(name).ok()?;
    }
    None
}

/// An encryption context as logged: string values only (CloudTrail logs them as strings).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Context(BTreeMap<String, String>);

impl Context {
    fn from_value(v: &Value) -> Option<Context> {
        let map = v.as_object()?;
        Some(Context(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect(),
        ))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn volume(&self, id: &str) -> bool {
        self.get(CONTEXT_VOLUME) == Some(id)
    }
}

/// The fields of one CloudTrail event kmsfs shows; the rest is skipped unread.
#[derive(Debug, Default)]
struct RawEvent {
    source: Option<String>,
    name: Option<String>,
    time: Option<String>,
    principal: Option<String>,
    source_ip: Option<String>,
    error_code: Option<String>,
    context: Option<Context>,
    source_context: Option<Context>,
    destination_context: Option<Context>,
    /// Whether it says it is an event at all (`eventSource` or `eventVersion`).
    is_event: bool,
}

impl RawEvent {
    /// Takes the value of `key` from `map`, if it is a field kmsfs shows.
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> std::result::Result<(), A::Error> {
        let text = |v: Value| v.as_str().map(str::to_string);
        match key {
            "eventSource" => {
                self.is_event = true;
                self.source = text(map.next_value()?);
            }
            "eventVersion" => {
                self.is_event = true;
                map.next_value::<IgnoredAny>()?;
            }
            "eventName" => self.name = text(map.next_value()?),
            "eventTime" => self.time = text(map.next_value()?),
            "sourceIPAddress" => self.source_ip = text(map.next_value()?),
            "errorCode" => self.error_code = text(map.next_value()?),
            "userIdentity" => {
                let identity: Value = map.next_value()?;
                self.principal = ["arn", "principalId", "type"].iter().find_map(|k| {
                    Some(
                        identity
                            .get(k)?
                            .as_str()
                            .filter(|s| !s.is_empty())?
                            .to_string(),
                    )
                });
            }
            "requestParameters" => {
                if let Some(params) = map.next_value::<Option<Params>>()? {
                    self.context = params.context;
                    self.source_context = params.source_context;
                    self.destination_context = params.destination_context;
                }
            }
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for RawEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = RawEvent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CloudTrail event (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawEvent, A::Error> {
                let mut event = RawEvent::default();
                while let Some(key) = map.next_key::<String>()? {
                    event.field(&key, &mut map)?;
                }
                Ok(event)
            }
        }
        d.deserialize_map(EventVisitor)
    }
}

/// The contexts of an event's `requestParameters` (the other parameters are skipped unread).
#[derive(Default)]
struct Params {
    context: Option<Context>,
    source_context: Option<Context>,
    destination_context: Option<Context>,
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ParamsVisitor;
        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("requestParameters as an object or null")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Params, A::Error> {
                let mut out = Params::default();
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "encryptionContext" => &mut out.context,
                        "sourceEncryptionContext" => &mut out.source_context,
                        "destinationEncryptionContext" => &mut out.destination_context,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Context::from_value(&map.next_value::<Value>()?);
                }
                Ok(out)
            }
        }
        d.deserialize_map(ParamsVisitor)
    }
}

/// A `Records` array, read one event at a time.
struct Records(Vec<RawEvent>);

impl<'de> Deserialize<'de> for Records {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct RecordsVisitor;
        impl<'de> Visitor<'de> for RecordsVisitor {
            type Value = Records;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Records array of CloudTrail events")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Records, A::Error> {
                let mut out = Vec::new();
                while let Some(event) = seq.next_element::<RawEvent>()? {
                    out.push(event);
                }
                Ok(Records(out))
            }
        }
        d.deserialize_seq(RecordsVisitor)
    }
}

/// One top-level JSON value of the input, a log file's document or one event: its events.
struct Document(Vec<RawEvent>);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct DocumentVisitor;
        impl<'de> Visitor<'de> for DocumentVisitor {
            type Value = Document;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a CloudTrail log file {\"Records\":[...]} or one event (a JSON object)",
                )
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Document, A::Error> {
                let mut event = RawEvent::default();
                let mut records = None;
                let mut lookup_events = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "Records" => records = Some(map.next_value::<Records>()?.0),
                        "Events" => {
                            lookup_events = true;
                            map.next_value::<IgnoredAny>()?;
                        }
                        _ => event.field(&key, &mut map)?,
                    }
                }
                match records {
                    Some(records) => Ok(Document(records)),
                    None if event.is_event => Ok(Document(vec![event])),
                    None if lookup_events => Err(de::Error::custom(
                        "an 'aws cloudtrail lookup-events' answer, not a log file: give its \
                         events, one a line (jq -c '.Events[].CloudTrailEvent | fromjson')",
                    )),
                    None => Err(de::Error::custom(
                        "a JSON object with neither a Records array nor an eventSource: not a \
                         CloudTrail log file or event",
                    )),
                }
            }
        }
        d.deserialize_map(DocumentVisitor)
    }
}

/// A parse failure as one line saying where.
fn input_error(e: serde_json::Error) -> Error {
    match e.classify() {
        serde_json::error::Category::Io => Error::Usage(format!("cannot read the input: {e}")),
        serde_json::error::Category::Data => Error::Usage(format!("not CloudTrail input: {e}")),
        _ => Error::Usage(format!("not CloudTrail JSON: {e}")),
    }
}

/// `input`, decompressed if it starts with the gzip magic bytes (1f 8b) whatever its name.
fn decompressed<'r>(mut input: impl Read + 'r) -> Result<Box<dyn Read + 'r>> {
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("cannot read the input", e)),
        }
    }
    let whole = io::Cursor::new(head[..got].to_vec()).chain(input);
    Ok(if head[..got] == [0x1f, 0x8b] {
        Box::new(Gunzip(flate2::read::MultiGzDecoder::new(whole)))
    } else {
        Box::new(whole)
    })
}

/// A gzip stream whose errors say so.
struct Gunzip<R>(flate2::read::MultiGzDecoder<R>);

impl<R: Read> Read for Gunzip<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("gzip-compressed input: {e}")))
    }
}

/// The input within its bounds: [`MAX_INPUT`] bytes in all, and [`MAX_LINE`] bytes a line
/// except a line that opens a Records document (`{"Records"`, whitespace allowed after the
/// brace), which CloudTrail writes as one line of any length and the Records visitor reads one
/// event at a time.
struct Bounded<R> {
    inner: io::BufReader<R>,
    /// Bytes read so far, and the most allowed ([`MAX_INPUT`]).
    total: u64,
    max_total: u64,
    /// This line's number (from 1) and length so far.
    line: u64,
    len: usize,
    opening: Opening,
}

/// How far a line's start matches `{"Records"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// Only whitespace so far.
    Start,
    /// The brace and this many bytes of the key.
    Key(usize),
    /// It opens a Records document: no line limit.
    Records,
    /// Anything else.
    Other,
}

const RECORDS_KEY: &[u8] = b"\"Records\"";

impl<R: Read> Bounded<R> {
    fn new(inner: R) -> Self {
        Bounded {
            inner: io::BufReader::with_capacity(1 << 16, inner),
            total: 0,
            max_total: MAX_INPUT,
            line: 1,
            len: 0,
            opening: Opening::Start,
        }
    }

    fn step(&mut self, b: u8) -> io::Result<()> {
        if b == b'\n' {
            self.line += 1;
            self.len = 0;
            self.opening = Opening::Start;
            return Ok(());
        }
        self.len += 1;
        self.opening = match self.opening {
            Opening::Start if b.is_ascii_whitespace() => Opening::Start,
            Opening::Start if b == b'{' => Opening::Key(0),
            Opening::Key(0) if b.is_ascii_whitespace() => Opening::Key(0),
            Opening::Key(i) if b == RECORDS_KEY[i] && i + 1 == RECORDS_KEY.len() => {
                Opening::Records
            }
            Opening::Key(i) if b == RECORDS_KEY[i] => Opening::Key(i + 1),
            Opening::Records => Opening::Records,
            _ => Opening::Other,
        };
        if self.len > MAX_LINE && self.opening != Opening::Records {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "line {} is longer than {} MiB (one event a line, or a log file's \
                     {{\"Records\":[...]}})",
                    self.line,
                    MAX_LINE >> 20
                ),
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.max_total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the input is larger than {} (after decompression); give it in parts",
                    if self.max_total >= 1 << 30 {
                        format!("{} GiB", self.max_total >> 30)
                    } else {
                        format!("{} bytes", self.max_total)
                    }
                ),
            ));
        }
        for &b in &buf[..n] {
            self.step(b)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests remove a directory on the store by path
mod tests {
    use std::io::Write;
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::core::volume::InitOptions;
    use crate::keys::spec::KeySpec;

    const LONG: &str = "quarterly-payroll-reconciliation-for-the-acme-corporation-and-all-of-its-\
                        subsidiaries-in-every-region-including-the-ones-acquired-in-2026-final-version-2-approved.xlsx";

    fn path(p: &str) -> CanonicalPath {
        CanonicalPath::from_user(Path::new(p)).unwrap()
    }

    /// A volume with encrypted names holding `/acme-corp/payroll-2026-12.xlsx`, `/a`, a file
    /// with a long name in `/acme-corp`, and `/old/q3.txt`.
    fn volume() -> (tempfile::TempDir, Volume) {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let v = Volume::init(
            &backing,
            InitOptions {
                keys: vec![KeySpec::Local(dir.path().join("keys/master.key"))],
                ..Default::default()
            },
        )
        .unwrap()
        .volume;
        assert!(v.encrypted_names());
        assert!(LONG.len() >= 160, "a long name needs a side record");
        for d in ["acme-corp", "old"] {
            let mut attrs = crate::core::file::own_file_attrs(0o755);
            attrs.kind = crate::format::header::ObjectKind::Dir;
            let at = v.prepare_entry(&path(d)).unwrap();
            crate::core::file::make_dir(&v, &at, attrs).unwrap();
        }
        let long = format!("acme-corp/{LONG}");
        for f in ["acme-corp/payroll-2026-12.xlsx", "a", &long, "old/q3.txt"] {
            let at = v.prepare_entry(&path(f)).unwrap();
            crate::core::file::write_new_file(&v, &at, &mut &b"data"[..]).unwrap();
        }
        (dir, v)
    }

    fn stored(v: &Volume, p: &str) -> String {
        v.stored_path(&path(p)).unwrap().to_string()
    }

    fn file_context(v: &Volume, stored: &str) -> Value {
        json!({"kmsfs:volume": v.id_hex(), "kmsfs:path": stored, "tenant_id": "acme"})
    }

    /// A KMS event as CloudTrail logs it.
    fn event(name: &str, params: Value) -> Value {
        json!({
            "eventVersion": "1.11",
            "userIdentity": {
                "type": "AssumedRole",
                "principalId": "AROAEXAMPLE:i-0abc",
                "arn": "arn:aws:sts::111122223333:assumed-role/kmsfs-host/i-0abc",
                "accountId": "111122223333"
            },
            "eventTime": "2026-12-01T09:30:00Z",
            "eventSource": "kms.amazonaws.com",
            "eventName": name,
            "awsRegion": "eu-west-1",
            "sourceIPAddress": "192.0.2.10",
            "userAgent": "aws-sdk-rust",
            "requestParameters": params,
            "responseElements": null,
            "requestID": "0b9d1c36-2c9e-4d0b-8a0f-3f1e0c5b7a11",
            "eventID": "5e3c1b7e-8f64-4f0e-9b55-2d0b4c6f9e21",
            "readOnly": true,
            "eventType": "AwsApiCall",
            "recipientAccountId": "111122223333"
        })
    }

    fn decrypt(ctx: Value) -> Value {
        event(
            "Decrypt",
            json!({"encryptionAlgorithm": "SYMMETRIC_DEFAULT", "keyId": "arn:aws:kms:eu-west-1:111122223333:key/k", "encryptionContext": ctx}),
        )
    }

    /// The events of a small log: a Decrypt, a GenerateDataKey of the long name, another
    /// volume's Decrypt, an S3 event, the volume config's Decrypt.
    fn log(v: &Volume) -> Vec<Value> {
        let mut other = file_context(v, &stored(v, "a"));
        other["kmsfs:volume"] = json!("0123456789abcdef0123456789abcdef");
        vec![
            decrypt(file_context(
                v,
                &stored(v, "acme-corp/payroll-2026-12.xlsx"),
            )),
            event(
                "GenerateDataKey",
                json!({"keyId": "alias/kmsfs", "keySpec": "AES_256",
                       "encryptionContext": file_context(v, &stored(v, &format!("acme-corp/{LONG}")))}),
            ),
            decrypt(other),
            json!({"eventVersion": "1.11", "eventSource": "s3.amazonaws.com", "eventName": "GetObject",
                   "requestParameters": {"bucketName": "b", "key": "k"}}),
            decrypt(
                json!({"kmsfs:volume": v.id_hex(), "kmsfs:purpose": "volume-config", "tenant_id": "acme"}),
            ),
        ]
    }

    fn read(v: &Volume, input: &[u8]) -> Result<(Vec<AuditEvent>, Summary)> {
        let mut events = Vec::new();
        let summary = Auditor::new(v).read(input, |e| {
            events.push(e.clone());
            Ok(())
        })?;
        Ok((events, summary))
    }

    fn records(events: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "Records": events })).unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn check_log(v: &Volume, events: &[AuditEvent], summary: Summary) {
        let long = format!("/acme-corp/{LONG}");
        let plain: Vec<_> = events.iter().map(|e| e.target.plain()).collect();
        assert_eq!(
            plain,
            [
                Some("/acme-corp/payroll-2026-12.xlsx"),
                Some(long.as_str()),
                None
            ]
        );
        assert_eq!(
            events[0].target.stored(),
            Some(stored(v, "acme-corp/payroll-2026-12.xlsx").as_str())
        );
        assert_ne!(events[0].target.stored(), events[0].target.plain());
        assert_eq!(events[2].target, Named::NoPath("volume config".into()));
        assert_eq!(
            events[0].principal.as_deref(),
            Some("arn:aws:sts::111122223333:assumed-role/kmsfs-host/i-0abc")
        );
        assert_eq!(events[1].operation, "GenerateDataKey");
        assert_eq!(events[0].source_ip.as_deref(), Some("192.0.2.10"));
        assert_eq!(events[0].time.as_deref(), Some("2026-12-01T09:30:00Z"));
        assert_eq!(
            summary,
            Summary {
                events: 3,
                skipped: 2,
                undecoded: 0
            }
        );
    }

    #[test]
    fn a_records_file_plain_or_gzipped() {
        let (_d, v) = volume();
        let file = records(&log(&v));
        let (events, summary) = read(&v, &file).unwrap();
        check_log(&v, &events, summary);
        let (again, summary) = read(&v, &gzip(&file)).unwrap();
        assert_eq!(again, events);
        check_log(&v, &again, summary);
        // Pretty-printed, and two log files one after the other (zcat *.json.gz).
        let pretty = serde_json::to_vec_pretty(&json!({ "Records": log(&v) })).unwrap();
        let (events, summary) = read(&v, &pretty).unwrap();
        check_log(&v, &events, summary);
        let two = [file.clone(), b"\n".to_vec(), file.clone()].concat();
        let (events, summary) = read(&v, &gzip(&two)).unwrap();
        assert_eq!(events.len(), 6);
        assert_eq!(summary.skipped, 4);
        // Two gzip members concatenated (cat *.json.gz).
        let (events, _) = read(&v, &[gzip(&file), gzip(&file)].concat()).unwrap();
        assert_eq!(events.len(), 6);
    }

    #[test]
    fn json_lines_with_blank_lines() {
        let (_d, v) = volume();
        let mut lines = Vec::new();
        for e in log(&v) {
            lines.extend(serde_json::to_vec(&e).unwrap());
            lines.extend(b"\n\n  \r\n");
        }
        let (events, summary) = read(&v, &lines).unwrap();
        check_log(&v, &events, summary);
        let (events, _) = read(&v, &gzip(&lines)).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(read(&v, b"").unwrap().1, Summary::default());
        assert_eq!(read(&v, b"\n \n").unwrap().1, Summary::default());
    }

    #[test]
    fn reencrypt_shows_both_paths_and_failed_calls_are_kept() {
        let (_d, v) = volume();
        let from = stored(&v, "a");
        let to = stored(&v, "acme-corp/payroll-2026-12.xlsx");
        let mut re = event(
            "ReEncrypt",
            json!({
                "sourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "sourceEncryptionContext": file_context(&v, &from),
                "destinationKeyId": "arn:aws:kms:eu-west-1:111122223333:key/k",
                "destinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "destinationEncryptionContext": file_context(&v, &to),
            }),
        );
        let mut denied = decrypt(file_context(&v, &to));
        denied["errorCode"] = json!("AccessDeniedException");
        denied["errorMessage"] = json!("not authorized");
        denied["userIdentity"] = json!({"type": "IAMUser", "principalId": "AIDAEXAMPLE"});
        let (events, summary) = read(&v, &records(&[re.clone(), denied])).unwrap();
        assert_eq!(events[0].operation, "ReEncrypt");
        assert_eq!(events[0].from.as_ref().unwrap().plain(), Some("/a"));
        assert_eq!(
            events[0].from.as_ref().unwrap().stored(),
            Some(from.as_str())
        );
        assert_eq!(
            events[0].target.plain(),
            Some("/acme-corp/payroll-2026-12.xlsx")
        );
        assert_eq!(
            events[1].event_error.as_deref(),
            Some("AccessDeniedException")
        );
        assert_eq!(events[1].principal.as_deref(), Some("AIDAEXAMPLE"));
        assert_eq!(
            events[1].target.plain(),
            Some("/acme-corp/payroll-2026-12.xlsx")
        );
        assert_eq!(summary.events, 2);
        // A ReEncrypt from another volume into this one is this volume's; the other side
        // says whose it is.
        re["requestParameters"]["sourceEncryptionContext"]["kmsfs:volume"] =
            json!("0123456789abcdef0123456789abcdef");
        let (events, _) = read(&v, &records(&[re])).unwrap();
        assert_eq!(
            events[0].from,
            Some(Named::NoPath(
                "volume 0123456789abcdef0123456789abcdef, not this one".into()
            ))
        );
    }

    #[test]
    fn paths_that_no_longer_decode_say_why() {
        let (_d, v) = volume();
        let gone = stored(&v, "old/q3.txt");
        let long = stored(&v, &format!("acme-corp/{LONG}"));
        // The directory goes (its record with it), the long name's file and side record too.
        let old = stored(&v, "old");
        std::fs::remove_dir_all(
            v.root().join(
                CanonicalPath::from_encoded(&old)
                    .unwrap()
                    .to_relative_path(),
            ),
        )
        .unwrap();
        let entry = CanonicalPath::from_encoded(&long).unwrap();
        let name = entry.to_relative_path();
        let name = name.file_name().unwrap().to_str().unwrap();
        let side = entry
            .parent()
            .unwrap()
            .join(name_format::side_record(name).as_bytes())
            .unwrap();
        for p in [&entry, &side] {
            std::fs::remove_file(v.root().join(p.to_relative_path())).unwrap();
        }
        let events = [
            decrypt(file_context(&v, &gone)),
            decrypt(file_context(&v, &long)),
            decrypt(file_context(&v, "/not//canonical")),
            decrypt(file_context(
                &v,
                &format!(
                    "{}/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                    stored(&v, "acme-corp")
                ),
            )),
            decrypt(json!({"kmsfs:volume": v.id_hex()})),
        ];
        let (events, summary) = read(&v, &records(&events)).unwrap();
        let why: Vec<_> = events.iter().map(|e| e.target.why().unwrap()).collect();
        assert!(
            why[0].starts_with("directory /old no longer exists"),
            "{}",
            why[0]
        );
        assert!(
            why[1].contains("long name in /acme-corp whose side record is gone"),
            "{}",
            why[1]
        );
        assert!(why[2].starts_with("not a stored path"), "{}", why[2]);
        assert!(
            why[3].starts_with("in directory /acme-corp: a name that does not decrypt"),
            "{}",
            why[3]
        );
        assert_eq!(why[4], "no kmsfs:path in the context");
        assert_eq!(events[0].target.stored(), Some(gone.as_str()));
        assert_eq!(summary.undecoded, 4);
        let mut names = NameCache::default();
        assert!(decode(&v, &mut names, &gone).is_err());
        // A file removed since (short name) still decodes: its directory is there.
        let a = stored(&v, "a");
        let at = CanonicalPath::from_encoded(&a).unwrap();
        std::fs::remove_file(v.root().join(at.to_relative_path())).unwrap();
        assert_eq!(decode(&v, &mut names, &a).unwrap(), path("a"));
        assert_eq!(
            decode(
                &v,
                &mut names,
                &stored(&v, "acme-corp/payroll-2026-12.xlsx")
            )
            .unwrap(),
            path("acme-corp/payroll-2026-12.xlsx")
        );
    }

    #[test]
    fn other_volumes_and_services_are_skipped() {
        let (_d, v) = volume();
        let a = stored(&v, "a");
        let mut not_kms = decrypt(file_context(&v, &a));
        not_kms["eventSource"] = json!("kms.example.com");
        let mut other = decrypt(file_context(&v, &a));
        other["requestParameters"]["encryptionContext"]["kmsfs:volume"] =
            json!(v.id_hex().to_uppercase());
        let events = [
            not_kms,
            other,
            decrypt(json!({"Department": "Engineering"})),
            event("Decrypt", Value::Null),
            event("CreateKey", json!({"keySpec": "SYMMETRIC_DEFAULT"})),
            json!({"eventVersion": "1.11"}),
        ];
        let (events, summary) = read(&v, &records(&events)).unwrap();
        assert!(events.is_empty());
        assert_eq!(summary.skipped, 6);
    }

    #[test]
    fn malformed_input_is_refused_in_one_line() {
        let (_d, v) = volume();
        let one = serde_json::to_vec(&log(&v)[0]).unwrap();
        let big = [
            br#"{"eventSource":"kms.amazonaws.com","x":""#.to_vec(),
            vec![b'x'; MAX_LINE],
            br#""}"#.to_vec(),
        ]
        .concat();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello".to_vec(), "not CloudTrail JSON"),
            (b"{\"Records\": 3}".to_vec(), "Records array"),
            (b"{\"Records\": [1]}".to_vec(), "CloudTrail event"),
            (
                b"{\"foo\": 1}".to_vec(),
                "neither a Records array nor an eventSource",
            ),
            (b"{\"Events\": []}".to_vec(), "lookup-events"),
            (b"[]".to_vec(), "not CloudTrail input"),
            (b"42".to_vec(), "not CloudTrail input"),
            (one[..one.len() - 1].to_vec(), "EOF"),
            (
                [one.clone(), b" trailing".to_vec()].concat(),
                "not CloudTrail JSON",
            ),
            (vec![0x1f, 0x8b, 1, 2, 3], "gzip"),
            (gzip(&one)[..20].to_vec(), "gzip"),
            (big, "longer than 1 MiB"),
        ];
        for (input, expected) in cases {
            let e = read(&v, &input).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Usage(_)), "{msg}");
            assert!(msg.contains(expected), "{expected}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn a_records_line_may_be_long_and_every_prefix_is_handled() {
        let (_d, v) = volume();
        let many: Vec<Value> = log(&v).into_iter().cycle().take(5_000).collect();
        let file = records(&many);
        assert!(file.len() > MAX_LINE && !file.contains(&b'\n'));
        let (events, summary) = read(&v, &file).unwrap();
        assert_eq!((events.len(), summary.skipped), (3_000, 2_000));
        // Cut anywhere: an answer or an error, never a panic.
        let small = records(&log(&v));
        let packed = gzip(&small);
        for cut in 0..small.len() {
            let _ = read(&v, &small[..cut]);
            let _ = read(&v, &packed[..cut.min(packed.len())]);
        }
    }

    #[test]
    fn deep_nesting_is_skipped_or_refused_never_a_crash() {
        let (_d, v) = volume();
        let deep = |n: usize| [b"[".repeat(n), b"]".repeat(n)].concat();
        let event = |at: &str, close: &str| {
            [
                format!(r#"{{"eventSource":"kms.amazonaws.com",{at}"#).into_bytes(),
                deep(100_000),
                close.as_bytes().to_vec(),
            ]
            .concat()
        };
        // Kept as values: past serde_json's depth limit, refused.
        for input in [
            event(r#""userIdentity":"#, "}"),
            event(r#""requestParameters":{"encryptionContext":"#, "}}"),
            [
                br#"{"Records":[{"userIdentity":"#.to_vec(),
                deep(100_000),
                b"}]}".to_vec(),
            ]
            .concat(),
        ] {
            let e = read(&v, &input).unwrap_err().to_string();
            assert!(e.contains("recursion limit"), "{e}");
        }
        // Skipped unread, however deep.
        for input in [
            event(r#""anythingElse":"#, "}"),
            event(r#""requestParameters":{"other":"#, "}}"),
        ] {
            assert_eq!(read(&v, &input).unwrap().1.skipped, 1);
        }
    }

    #[test]
    fn the_input_bound_counts_decompressed_bytes() {
        // A gzip bomb in miniature: 64 KiB of blanks from a few dozen bytes.
        let bomb = gzip(&vec![b' '; 1 << 16]);
        assert!(bomb.len() < 1 << 10);
        let mut input = Bounded::new(decompressed(&bomb[..]).unwrap());
        input.max_total = 1 << 15;
        let e = io::copy(&mut input, &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains("larger than 32768 bytes"), "{e}");
        let mut input = Bounded::new(decompressed(&bomb[..]).unwrap());
        input.max_total = 1 << 16;
        assert_eq!(io::copy(&mut input, &mut io::sink()).unwrap(), 1 << 16);
    }

    #[test]
    fn the_line_bound_counts_per_line() {
        let mut b = Bounded::new(&b""[..]);
        for &c in b"  {  \"Records\"" {
            b.step(c).unwrap();
        }
        assert_eq!(b.opening, Opening::Records);
        b.step(b'\n').unwrap();
        assert_eq!((b.opening, b.line, b.len), (Opening::Start, 2, 0));
        for &c in b"{\"Recor ds\"" {
            b.step(c).unwrap();
        }
        assert_eq!(b.opening, Opening::Other);
        for _ in 0..MAX_LINE - 11 {
            b.step(b'x').unwrap();
        }
        assert!(b.step(b'x').is_err());
    }
}
