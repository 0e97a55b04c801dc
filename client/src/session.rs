//! Read-your-writes and monotonic-reads sessions: per partition, the furthest point of the
//! log a client has seen or written, sent with every fetch as a *session token* so that the
//! replica serving the read (a follower, or a new leader after a failover) answers only once it
//! has caught up with it.
//!
//! A [`Session`] keeps, per (topic, partition), an exclusive end offset and a leader epoch:
//!
//! - after an acknowledged write of offsets `[base, base + n)` the offset is at least
//!   `base + n` and the epoch at least the epoch the leader answered with
//!   ([`Session::note_write`]);
//! - after a read reporting high watermark `h` the offset is at least `h`, and the epoch at least
//!   the serving replica's ([`Session::note_read`]).
//!
//! Both only grow (max semantics), so [`Session::merge`] is a per-partition maximum and merging
//! is commutative, associative and idempotent. A [`Token`] asks the serving replica for a high
//! watermark of at least `min_high_watermark` and a leader epoch of at least `min_leader_epoch`.
//!
//! Sessions can be passed between processes as text ([`Session::to_text`], [`Session::parse`],
//! [`Session::load`], [`Session::save`]):
//!
//! ```text
//! skein-session 1
//! orders 0 1042 3
//! orders 1 977 3
//! ```
//!
//! The first line is the format and its version; each further line is `TOPIC PARTITION OFFSET
//! EPOCH` separated by single spaces (any run of spaces or tabs is accepted), with `OFFSET` the
//! exclusive end offset and `EPOCH` the leader epoch. In `TOPIC`, bytes that are not printable
//! ASCII, and `%`, are written as `%XX` (two hex digits), so every name round-trips; broker topic
//! names never need it. Empty lines are ignored; a partition listed twice takes the maximum.
//!
//! What this module does *not* do: it sends nothing and knows nothing of replicas. The producer
//! notes writes and the consumer notes reads and sends tokens (see `consumer.rs`); the brokers
//! enforce them. A session gives no guarantee for writes a failover loses (`acks = leader`) or
//! for records an unclean leader election drops: see PROTOCOL.md, "Read guarantees".

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A session shared by the producers and consumers of one thread (the client is
/// single-threaded): pass clones of it in `ProducerConfig::session` and
/// `ConsumerConfig::session`.
pub type SessionHandle = Rc<RefCell<Session>>;

/// What a read must wait for: the serving replica's high watermark at least
/// `min_high_watermark` and its leader epoch at least `min_leader_epoch` (0: no bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Token {
    /// Exclusive end offset the session has seen or written.
    pub min_high_watermark: u64,
    /// Newest leader epoch the session has seen.
    pub min_leader_epoch: u32,
}

impl Token {
    fn max(self, other: Token) -> Token {
        Token {
            min_high_watermark: self.min_high_watermark.max(other.min_high_watermark),
            min_leader_epoch: self.min_leader_epoch.max(other.min_leader_epoch),
        }
    }
}

/// Per-partition tokens of one client session (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// By topic, then partition: two levels so lookups by `&str` do not allocate, and ordered
    /// so the text form is deterministic.
    topics: BTreeMap<String, BTreeMap<u32, Token>>,
}

/// Why a session could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The first line is not `skein-session 1`.
    #[error("not a skein session (version 1): first line is '{found}'")]
    Header {
        /// The first line as found (empty if there is none).
        found: String,
    },
    /// A line after the first is not `TOPIC PARTITION OFFSET EPOCH`.
    #[error("line {line}: {reason}: '{text}'")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The line as found.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading or writing the file failed.
    #[error("session file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

impl Session {
    /// An empty session: no tokens.
    pub fn new() -> Session {
        Session::default()
    }

    /// Wraps the session for sharing between producers and consumers.
    pub fn into_handle(self) -> SessionHandle {
        Rc::new(RefCell::new(self))
    }

    /// Notes an acknowledged write: the partition holds offsets up to `end_offset_exclusive`
    /// (base offset + record count), written under `leader_epoch`.
    pub fn note_write(&mut self, topic: &str, partition: u32, end_offset_exclusive: u64, leader_epoch: u32) {
        self.note(topic, partition, Token { min_high_watermark: end_offset_exclusive, min_leader_epoch: leader_epoch });
    }

    /// Notes a read: the serving replica reported `high_watermark` and knew `leader_epoch`.
    pub fn note_read(&mut self, topic: &str, partition: u32, high_watermark: u64, leader_epoch: u32) {
        self.note(topic, partition, Token { min_high_watermark: high_watermark, min_leader_epoch: leader_epoch });
    }

    /// The token to send with a read of the partition; `None` if the session has noted
    /// nothing for it (or only zeros).
    pub fn token(&self, topic: &str, partition: u32) -> Option<Token> {
        self.topics.get(topic)?.get(&partition).copied().filter(|t| *t != Token::default())
    }

    /// Takes in another session (of another process, or a file): per partition the maximum.
    pub fn merge(&mut self, other: &Session) {
        for (topic, partitions) in &other.topics {
            for (&partition, &token) in partitions {
                self.note(topic, partition, token);
            }
        }
    }

    /// Whether no partition has a token.
    pub fn is_empty(&self) -> bool {
        self.topics.values().all(BTreeMap::is_empty)
    }

    /// Every `(topic, partition, token)`, by topic then partition.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32, Token)> + '_ {
        self.topics.iter().flat_map(|(t, ps)| ps.iter().map(move |(&p, &token)| (t.as_str(), p, token)))
    }

    /// The text form (see the module docs); [`Session::parse`] reads it back.
    pub fn to_text(&self) -> String {
        let mut out = String::from(HEADER);
        out.push('\n');
        for (topic, partition, token) in self.iter() {
            escape_topic(topic, &mut out);
            // Writing to a String cannot fail.
            let _ = writeln!(out, " {partition} {} {}", token.min_high_watermark, token.min_leader_epoch);
        }
        out
    }

    /// Reads the text form; never panics, and names the first bad line.
    pub fn parse(text: &str) -> Result<Session, SessionError> {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("").trim_end();
        if header != HEADER {
            return Err(SessionError::Header { found: header.chars().take(80).collect() });
        }
        let mut session = Session::new();
        for (i, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason| SessionError::Line { line: i + 2, text: line.chars().take(200).collect(), reason };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [topic, partition, offset, epoch] = fields[..] else {
                return Err(bad("expected TOPIC PARTITION OFFSET EPOCH"));
            };
            let topic = unescape_topic(topic).ok_or_else(|| bad("bad %XX escape or not UTF-8 in the topic"))?;
            let partition: u32 = partition.parse().map_err(|_| bad("partition is not a u32"))?;
            let offset: u64 = offset.parse().map_err(|_| bad("offset is not a u64"))?;
            let epoch: u32 = epoch.parse().map_err(|_| bad("epoch is not a u32"))?;
            session.note_write(&topic, partition, offset, epoch);
        }
        Ok(session)
    }

    /// Reads a session file; a missing file is an empty session.
    pub fn load(path: &Path) -> Result<Session, SessionError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Session::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Session::new()),
            Err(source) => Err(SessionError::Io { path: path.to_owned(), source }),
        }
    }

    /// Writes the session to `path` atomically: to `PATH.tmp`, synced, then renamed over
    /// `path`, so a reader (or a crash) sees the old file or the new one, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), SessionError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |source| SessionError::Io { path: path.to_owned(), source };
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_text().as_bytes())?;
            f.sync_all()
        };
        write().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Raises the partition's token to at least `token`. An empty topic name is ignored: no
    /// such topic can exist, and the text form could not name it.
    fn note(&mut self, topic: &str, partition: u32, token: Token) {
        if topic.is_empty() {
            return;
        }
        // Look up by `&str` first: the topic is known on every call but the first.
        let partitions = match self.topics.get_mut(topic) {
            Some(p) => p,
            None => self.topics.entry(topic.to_owned()).or_default(),
        };
        let entry = partitions.entry(partition).or_default();
        *entry = entry.max(token);
    }
}

/// Appends `topic` with `%`, and bytes that are not printable ASCII, as `%XX`.
fn escape_topic(topic: &str, out: &mut String) {
    for &b in topic.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Reverses [`escape_topic`]; `None` for a bad escape, a result that is not UTF-8, or an
/// empty name.
fn unescape_topic(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|t| !t.is_empty())
}

/// The first line of the text form: format name and version.
const HEADER: &str = "skein-session 1";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token(min_high_watermark: u64, min_leader_epoch: u32) -> Option<Token> {
        Some(Token { min_high_watermark, min_leader_epoch })
    }

    #[test]
    fn notes_only_raise_tokens() {
        let mut s = Session::new();
        assert_eq!(s.token("t", 0), None);
        assert!(s.is_empty());
        s.note_write("t", 0, 10, 2);
        assert_eq!(s.token("t", 0), token(10, 2));
        // An older read (a lagging follower) lowers nothing.
        s.note_read("t", 0, 7, 1);
        assert_eq!(s.token("t", 0), token(10, 2));
        // Offset and epoch rise independently.
        s.note_read("t", 0, 12, 1);
        assert_eq!(s.token("t", 0), token(12, 2));
        s.note_write("t", 0, 3, 5);
        assert_eq!(s.token("t", 0), token(12, 5));
        assert_eq!(s.token("t", 1), None);
        assert_eq!(s.token("u", 0), None);
        s.note_read("t", 1, 0, 0);
        assert_eq!(s.token("t", 1), None, "zeros are no token");
        s.note_write("", 0, 5, 5);
        assert_eq!(s.iter().count(), 2, "an empty topic name is ignored");
    }

    #[test]
    fn merge_takes_the_maximum_per_partition() {
        let mut a = Session::new();
        a.note_write("t", 0, 10, 1);
        a.note_write("t", 1, 4, 3);
        let mut b = Session::new();
        b.note_write("t", 0, 8, 2);
        b.note_write("u", 5, 1, 1);
        let mut ab = a.clone();
        ab.merge(&b);
        assert_eq!(ab.token("t", 0), token(10, 2));
        assert_eq!(ab.token("t", 1), token(4, 3));
        assert_eq!(ab.token("u", 5), token(1, 1));
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba, "merge commutes");
        let mut again = ab.clone();
        again.merge(&a);
        assert_eq!(again, ab, "merge is idempotent");
    }

    #[test]
    fn text_round_trips_and_is_readable() {
        let mut s = Session::new();
        s.note_write("orders", 1, 977, 3);
        s.note_write("orders", 0, 1042, 3);
        s.note_write("odd name%", 0, 1, 1);
        let text = s.to_text();
        assert_eq!(text, "skein-session 1\nodd%20name%25 0 1 1\norders 0 1042 3\norders 1 977 3\n");
        assert_eq!(Session::parse(&text).expect("parses"), s);
        // Tabs, runs of spaces, CRLF, blank lines and duplicates (maximum) are accepted.
        let loose = Session::parse("skein-session 1\r\n\norders\t0  5 4\r\norders 0 3 9\n").expect("parses");
        assert_eq!(loose.token("orders", 0), token(5, 9));
        assert_eq!(Session::parse("skein-session 1").expect("parses"), Session::new());
    }

    /// The line a parse error names, or the header error.
    fn check_bad(text: &str, line: Option<usize>) {
        match (Session::parse(text), line) {
            (Err(SessionError::Line { line: got, .. }), Some(want)) => assert_eq!(got, want, "{text:?}"),
            (Err(SessionError::Header { .. }), None) => {}
            (other, _) => panic!("{text:?}: expected an error at {line:?}, got {other:?}"),
        }
    }

    #[test]
    fn bad_input_names_the_line() {
        check_bad("", None);
        check_bad("skein-session 2\n", None);
        check_bad("t 0 1 1\n", None);
        check_bad("skein-session 1\nt 0 1\n", Some(2));
        check_bad("skein-session 1\nt 0 1 1\nt 0 1 1 1\n", Some(3));
        check_bad("skein-session 1\nt x 1 1\n", Some(2));
        check_bad("skein-session 1\nt 0 -1 1\n", Some(2));
        check_bad("skein-session 1\nt 0 1 4294967296\n", Some(2));
        check_bad("skein-session 1\nt 0 18446744073709551616 1\n", Some(2));
        check_bad("skein-session 1\n\nt%2 0 1 1\n", Some(3));
        check_bad("skein-session 1\nt%zz 0 1 1\n", Some(2));
        check_bad("skein-session 1\n%FF 0 1 1\n", Some(2));
        check_bad("skein-session 1\n%C3% 0 1 1\n", Some(2));
        let err = Session::parse("skein-session 1\nt 0 x 1\n").expect_err("bad offset");
        assert_eq!(err.to_string(), "line 2: offset is not a u64: 't 0 x 1'");
    }

    #[test]
    fn files_save_atomically_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("skein-session-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("session");
        let _ = std::fs::remove_file(&path);
        assert_eq!(Session::load(&path).expect("missing is empty"), Session::new());
        let mut s = Session::new();
        s.note_write("t", 0, 10, 2);
        s.save(&path).expect("saved");
        assert_eq!(Session::load(&path).expect("loads"), s);
        assert!(!dir.join("session.tmp").exists(), "the temporary file was renamed");
        std::fs::write(&path, "garbage\n").expect("write");
        assert!(matches!(Session::load(&path), Err(SessionError::Header { .. })));
        assert!(matches!(Session::load(&dir), Err(SessionError::Io { .. })), "a directory is not a file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn arb_session() -> impl Strategy<Value = Session> {
        proptest::collection::vec((".{0,12}", 0u32..4, any::<u64>(), any::<u32>()), 0..12).prop_map(|notes| {
            let mut s = Session::new();
            for (t, p, o, e) in notes {
                s.note_write(&t, p, o, e);
            }
            s
        })
    }

    proptest! {
        #[test]
        fn parse_inverts_to_text(s in arb_session()) {
            prop_assert_eq!(Session::parse(&s.to_text()).expect("own output parses"), s);
        }

        #[test]
        fn parse_never_panics(text in "(skein-session 1\n)?[ -~\t\n%é]{0,200}") {
            let _ = Session::parse(&text);
        }

        #[test]
        fn merge_is_a_per_partition_maximum(a in arb_session(), b in arb_session()) {
            let mut m = a.clone();
            m.merge(&b);
            for (t, p, tok) in m.iter() {
                let x = a.token(t, p).unwrap_or_default();
                let y = b.token(t, p).unwrap_or_default();
                prop_assert_eq!(tok, x.max(y));
            }
            prop_assert!(a.iter().chain(b.iter()).all(|(t, p, tok)| tok == Token::default() || m.token(t, p).is_some()));
        }
    }
}
