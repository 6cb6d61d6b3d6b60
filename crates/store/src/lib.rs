//! Durable broker state on SQLite (`DIR/broker.db`): the [`Storage`] the broker's journal
//! commits to. Decision 0008 says why SQLite and what a commit costs.
//!
//! Three tables, all keyed by account first: `sessions` (a persistent session's expiry,
//! subscriptions and when it was left), `queue` (the QoS 1 messages stored for a session,
//! queued or sent and not yet acknowledged, by a sequence number unique across the broker's
//! life) and `retained`. A message is stored as the MQTT 5 PUBLISH packet that carries it
//! (topic, payload, QoS, RETAIN, forwarded properties; our own codec), with its wall-clock
//! expiry and publication time beside it. WAL with `synchronous=FULL`: a commit is on disk,
//! not only in a cache, when it returns.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use sekisho_broker::Message;
use sekisho_broker::durable::{
    Change, Loaded, LoadedMessage, LoadedQueued, LoadedWill, Snapshot, Storage, StorageError,
    StoredSession, StoredWill, WallClock,
};
use sekisho_mqtt::{QoS, SubscriptionOptions};

/// The schema version this build writes (`PRAGMA user_version`). 2: `queue.shared` and
/// `queue.packet_id`.
const SCHEMA: i64 = 2;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    account TEXT NOT NULL,
    client_id TEXT NOT NULL,
    expiry_ms INTEGER NOT NULL,
    subscriptions BLOB NOT NULL,
    disconnected_at_ms INTEGER,
    PRIMARY KEY (account, client_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    account TEXT NOT NULL,
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    message BLOB NOT NULL,
    expires_at_ms INTEGER,
    timestamp_ms INTEGER NOT NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    packet_id INTEGER,
    PRIMARY KEY (account, client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    account TEXT NOT NULL,
    topic TEXT NOT NULL,
    message BLOB NOT NULL,
    expires_at_ms INTEGER,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (account, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wills (
    account TEXT NOT NULL,
    id INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    certificate TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    message BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (account, id)
) WITHOUT ROWID;
";

fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError(e.to_string())
}

/// The SQLite store.
pub struct SqliteStorage {
    conn: Connection,
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").finish_non_exhaustive()
    }
}

impl SqliteStorage {
    /// Opens (creating if needed) the store at `path`. Refuses a database written by a newer
    /// build.
    pub fn open(path: &Path) -> Result<SqliteStorage, StorageError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA {
            return Err(StorageError(format!(
                "{} was written by a newer Sekisho (schema {version}, this build reads {SCHEMA})",
                path.display()
            )));
        }
        // Schema 1 (its tables exist) gains `queue.shared` (stored messages of shared groups)
        // and `queue.packet_id` (the id a message was sent with and not acknowledged).
        let upgrade = if version == 1 {
            "ALTER TABLE queue ADD COLUMN shared INTEGER NOT NULL DEFAULT 0; \
             ALTER TABLE queue ADD COLUMN packet_id INTEGER;"
        } else {
            ""
        };
        conn.execute_batch(&format!(
            "BEGIN; {upgrade} {CREATE} PRAGMA user_version = {SCHEMA}; COMMIT;"
        ))
        .map_err(err)?;
        Ok(SqliteStorage { conn })
    }
}

/// A message as the MQTT 5 PUBLISH that carries it.
fn encode_message(m: &Message) -> Result<Vec<u8>, StorageError> {
    m.to_publish_bytes().map_err(err)
}

fn decode_message(bytes: &[u8], timestamp_ms: u64) -> Result<Message, StorageError> {
    Message::from_publish_bytes(bytes, timestamp_ms)
        .ok_or_else(|| StorageError("a stored message is not a PUBLISH".into()))
}

/// Subscriptions as bytes: per filter, its length (u16, big-endian), the filter and the MQTT 5
/// subscription options byte.
fn encode_subscriptions(subs: &[(String, SubscriptionOptions)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (filter, o) in subs {
        let len = filter.len().min(u16::MAX as usize);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&filter.as_bytes()[..len]);
        out.push(
            (o.qos as u8)
                | (u8::from(o.no_local) << 2)
                | (u8::from(o.retain_as_published) << 3)
                | ((o.retain_handling & 3) << 4),
        );
    }
    out
}

fn decode_subscriptions(mut b: &[u8]) -> Result<Vec<(String, SubscriptionOptions)>, StorageError> {
    let bad = || StorageError("stored subscriptions are malformed".into());
    let mut out = Vec::new();
    while !b.is_empty() {
        let (len, rest) = b.split_first_chunk::<2>().ok_or_else(bad)?;
        let len = u16::from_be_bytes(*len) as usize;
        if rest.len() < len + 1 {
            return Err(bad());
        }
        let filter = std::str::from_utf8(&rest[..len]).map_err(|_| bad())?;
        let o = rest[len];
        out.push((
            filter.to_owned(),
            SubscriptionOptions {
                qos: if o & 3 == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                no_local: o & 4 != 0,
                retain_as_published: o & 8 != 0,
                retain_handling: (o >> 4) & 3,
            },
        ));
        b = &rest[len + 1..];
    }
    Ok(out)
}

fn skipped(c: &Change) {
    tracing::warn!(change = ?std::mem::discriminant(c), "a message that cannot be encoded was not stored");
}

fn ms(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

impl Storage for SqliteStorage {
    fn load(&mut self) -> Result<Snapshot, StorageError> {
        let mut snapshot = Snapshot::default();
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT account, topic, message, expires_at_ms, timestamp_ms FROM retained",
                )
                .map_err(err)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (account, bytes, expires, ts) = row.map_err(err)?;
                // A row this build cannot read is left out (and logged), not fatal.
                let Ok(message) = decode_message(&bytes, ts.max(0) as u64) else {
                    tracing::warn!(%account, "a stored retained message cannot be read; skipped");
                    continue;
                };
                snapshot.retained.push((
                    account,
                    LoadedMessage {
                        message,
                        expires_at_ms: ms(expires),
                    },
                ));
            }
        }
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT account, id, client_id, certificate, at_ms, message, timestamp_ms \
                     FROM wills ORDER BY id",
                )
                .map_err(err)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (account, id, client_id, certificate, at_ms, bytes, ts) = row.map_err(err)?;
                let Ok(message) = decode_message(&bytes, ts.max(0) as u64) else {
                    tracing::warn!(%account, %client_id, "a stored will cannot be read; skipped");
                    continue;
                };
                snapshot.wills.push(LoadedWill {
                    account,
                    id: id.max(0) as u64,
                    at_ms: at_ms.max(0) as u64,
                    will: StoredWill {
                        client_id: client_id.into(),
                        certificate: certificate.into(),
                        message: std::sync::Arc::new(message),
                    },
                });
            }
        }
        let mut st = self
            .conn
            .prepare("SELECT account, client_id, expiry_ms, subscriptions, disconnected_at_ms FROM sessions")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(err)?;
        let mut q = self
            .conn
            .prepare(
                "SELECT seq, retain, message, expires_at_ms, timestamp_ms, shared, packet_id \
                 FROM queue \
                 WHERE account = ?1 AND client_id = ?2 ORDER BY seq",
            )
            .map_err(err)?;
        for row in rows {
            let (account, client_id, expiry_ms, subs, left) = row.map_err(err)?;
            let mut queue = Vec::new();
            let entries = q
                .query_map(params![account, client_id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                })
                .map_err(err)?;
            for e in entries {
                let (seq, retain, bytes, expires, ts, shared, packet_id) = e.map_err(err)?;
                let Ok(message) = decode_message(&bytes, ts.max(0) as u64) else {
                    tracing::warn!(%account, %client_id, seq, "a stored message cannot be read; skipped");
                    continue;
                };
                queue.push(LoadedQueued {
                    seq: seq.max(0) as u64,
                    retain: retain != 0,
                    shared: shared != 0,
                    // Only an id MQTT allows (1 to 65,535) is used again.
                    packet_id: packet_id
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0),
                    message: LoadedMessage {
                        message,
                        expires_at_ms: ms(expires),
                    },
                });
            }
            let Ok(subscriptions) = decode_subscriptions(&subs) else {
                tracing::warn!(%account, %client_id, "a stored session cannot be read; skipped");
                continue;
            };
            snapshot.sessions.push(Loaded {
                account,
                client_id,
                session: StoredSession {
                    expiry: std::time::Duration::from_millis(expiry_ms.max(0) as u64),
                    subscriptions,
                    connected: left.is_none(),
                },
                disconnected_at_ms: ms(left),
                queue,
            });
        }
        Ok(snapshot)
    }

    fn commit(&mut self, changes: &[Change], clock: WallClock) -> Result<(), StorageError> {
        let tx = self.conn.transaction().map_err(err)?;
        for c in changes {
            match c {
                Change::PutSession {
                    account,
                    client_id,
                    session,
                } => {
                    let left = (!session.connected).then_some(clock.now_ms as i64);
                    // A session left earlier keeps the time it was left.
                    let kept: Option<Option<i64>> = if session.connected {
                        None
                    } else {
                        tx.prepare_cached(
                            "SELECT disconnected_at_ms FROM sessions WHERE account = ?1 AND client_id = ?2",
                        )
                        .and_then(|mut s| {
                            s.query_row(params![&**account, &**client_id], |r| r.get(0))
                                .optional()
                        })
                        .map_err(err)?
                    };
                    let left = kept.flatten().or(left);
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO sessions VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &**account,
                            &**client_id,
                            session.expiry.as_millis() as i64,
                            encode_subscriptions(&session.subscriptions),
                            left
                        ])
                    })
                    .map_err(err)?;
                }
                Change::DeleteSession { account, client_id } => {
                    for sql in [
                        "DELETE FROM sessions WHERE account = ?1 AND client_id = ?2",
                        "DELETE FROM queue WHERE account = ?1 AND client_id = ?2",
                    ] {
                        tx.prepare_cached(sql)
                            .and_then(|mut s| s.execute(params![&**account, &**client_id]))
                            .map_err(err)?;
                    }
                }
                Change::Append {
                    account,
                    client_id,
                    seq,
                    retain,
                    shared,
                    message,
                } => {
                    // A message our codec cannot write (a property over 64 KiB, say) is not
                    // stored; it must not fail the other changes of the batch.
                    let Ok(bytes) = encode_message(message) else {
                        skipped(c);
                        continue;
                    };
                    let expires = message.expires_at.map(|e| clock.ms(e) as i64);
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO queue (account, client_id, seq, retain, message, \
                         expires_at_ms, timestamp_ms, shared) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &**account,
                            &**client_id,
                            *seq as i64,
                            i64::from(*retain),
                            bytes,
                            expires,
                            message.timestamp_ms as i64,
                            i64::from(*shared)
                        ])
                    })
                    .map_err(err)?;
                }
                Change::Ack {
                    account,
                    client_id,
                    seq,
                } => {
                    tx.prepare_cached(
                        "DELETE FROM queue WHERE account = ?1 AND client_id = ?2 AND seq = ?3",
                    )
                    .and_then(|mut s| s.execute(params![&**account, &**client_id, *seq as i64]))
                    .map_err(err)?;
                }
                Change::Sent {
                    account,
                    client_id,
                    seq,
                    packet_id,
                } => {
                    tx.prepare_cached(
                        "UPDATE queue SET packet_id = ?4 \
                         WHERE account = ?1 AND client_id = ?2 AND seq = ?3",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &**account,
                            &**client_id,
                            *seq as i64,
                            i64::from(*packet_id)
                        ])
                    })
                    .map_err(err)?;
                }
                Change::PutWill {
                    account,
                    id,
                    at,
                    will,
                } => {
                    let Ok(bytes) = encode_message(&will.message) else {
                        skipped(c);
                        continue;
                    };
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO wills VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &**account,
                            *id as i64,
                            &*will.client_id,
                            &*will.certificate,
                            clock.ms(*at) as i64,
                            bytes,
                            will.message.timestamp_ms as i64
                        ])
                    })
                    .map_err(err)?;
                }
                Change::DeleteWill { account, id } => {
                    tx.prepare_cached("DELETE FROM wills WHERE account = ?1 AND id = ?2")
                        .and_then(|mut s| s.execute(params![&**account, *id as i64]))
                        .map_err(err)?;
                }
                Change::SetRetained {
                    account,
                    topic,
                    message,
                    ..
                } => match message {
                    Some(m) => {
                        let Ok(bytes) = encode_message(m) else {
                            skipped(c);
                            continue;
                        };
                        let expires = m.expires_at.map(|e| clock.ms(e) as i64);
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO retained VALUES (?1, ?2, ?3, ?4, ?5)",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                &**account,
                                &**topic,
                                bytes,
                                expires,
                                m.timestamp_ms as i64
                            ])
                        })
                        .map_err(err)?;
                    }
                    None => {
                        tx.prepare_cached("DELETE FROM retained WHERE account = ?1 AND topic = ?2")
                            .and_then(|mut s| s.execute(params![&**account, &**topic]))
                            .map_err(err)?;
                    }
                },
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sekisho_mqtt::{Properties, UserProperty};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sekisho-store-{name}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn message(topic: &str, payload: &'static [u8], expires_at: Option<Instant>) -> Arc<Message> {
        let properties = Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![UserProperty {
                key: "k".into(),
                value: "v".into(),
            }],
            ..Properties::default()
        };
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties,
            expires_at,
            origin: None,
            timestamp_ms: 1_700_000_000_000,
        })
    }

    #[test]
    fn what_is_committed_is_loaded_again() {
        let d = dir("roundtrip");
        let path = d.join("broker.db");
        let clock = WallClock::read();
        let (a, c): (Arc<str>, Arc<str>) = (Arc::from("111111111111"), Arc::from("dev-1"));
        let subs = vec![(
            "a/+/b".to_string(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        )];
        let mut will_message = (*message("last/will", b"gone", None)).clone();
        will_message.properties.message_expiry_interval = Some(90);
        let will_message = Arc::new(will_message);
        {
            let mut s = SqliteStorage::open(&path).unwrap();
            let expiring = message("t/2", b"two", Some(clock.now + Duration::from_secs(60)));
            s.commit(
                &[
                    Change::PutSession {
                        account: a.clone(),
                        client_id: c.clone(),
                        session: StoredSession {
                            expiry: Duration::from_secs(3600),
                            subscriptions: subs.clone(),
                            connected: true,
                        },
                    },
                    Change::Append {
                        account: a.clone(),
                        client_id: c.clone(),
                        seq: 7,
                        retain: false,
                        shared: false,
                        message: message("t/1", b"one", None),
                    },
                    Change::Append {
                        account: a.clone(),
                        client_id: c.clone(),
                        seq: 9,
                        retain: true,
                        shared: true,
                        message: expiring,
                    },
                    Change::Append {
                        account: a.clone(),
                        client_id: c.clone(),
                        seq: 8,
                        retain: false,
                        shared: false,
                        message: message("t/x", b"acked", None),
                    },
                    Change::Ack {
                        account: a.clone(),
                        client_id: c.clone(),
                        seq: 8,
                    },
                    Change::Sent {
                        account: a.clone(),
                        client_id: c.clone(),
                        seq: 9,
                        packet_id: 513,
                    },
                    Change::SetRetained {
                        account: a.clone(),
                        topic: Arc::from("r/1"),
                        message: Some(message("r/1", b"kept", None)),
                        published: true,
                    },
                    Change::SetRetained {
                        account: a.clone(),
                        topic: Arc::from("r/2"),
                        message: Some(message("r/2", b"cleared", None)),
                        published: true,
                    },
                    Change::SetRetained {
                        account: a.clone(),
                        topic: Arc::from("r/2"),
                        message: None,
                        published: true,
                    },
                    Change::PutWill {
                        account: a.clone(),
                        id: 11,
                        at: clock.now + Duration::from_secs(30),
                        will: StoredWill {
                            client_id: c.clone(),
                            certificate: Arc::from("ab12"),
                            message: will_message.clone(),
                        },
                    },
                    Change::PutWill {
                        account: a.clone(),
                        id: 12,
                        at: clock.now,
                        will: StoredWill {
                            client_id: c.clone(),
                            certificate: Arc::from("ab12"),
                            message: will_message.clone(),
                        },
                    },
                    Change::DeleteWill {
                        account: a.clone(),
                        id: 12,
                    },
                ],
                clock,
            )
            .unwrap();
        }
        let mut s = SqliteStorage::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.sessions.len(), 1);
        let l = &snap.sessions[0];
        assert_eq!(
            (l.account.as_str(), l.client_id.as_str()),
            ("111111111111", "dev-1")
        );
        assert_eq!(l.session.subscriptions, subs);
        assert_eq!(l.session.expiry, Duration::from_secs(3600));
        assert_eq!(l.disconnected_at_ms, None, "it was connected");
        let seqs: Vec<u64> = l.queue.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, [7, 9], "in order, the acknowledged one gone");
        assert!(!l.queue[0].retain && !l.queue[0].shared);
        assert!(l.queue[1].retain && l.queue[1].shared);
        assert_eq!(
            (l.queue[0].packet_id, l.queue[1].packet_id),
            (None, Some(513))
        );
        let m = &l.queue[1].message;
        assert_eq!(&m.message.payload[..], b"two");
        assert_eq!(
            m.message.properties.content_type.as_deref(),
            Some("text/plain")
        );
        assert_eq!(m.message.properties.user_properties.len(), 1);
        assert_eq!(m.message.timestamp_ms, 1_700_000_000_000);
        let exp = m.expires_at_ms.unwrap();
        assert!(exp.abs_diff(clock.now_ms + 60_000) < 5, "{exp}");
        assert_eq!(snap.retained.len(), 1);
        assert_eq!(&snap.retained[0].1.message.payload[..], b"kept");
        assert_eq!(snap.wills.len(), 1, "the deleted will is gone");
        let w = &snap.wills[0];
        assert_eq!((w.account.as_str(), w.id), ("111111111111", 11));
        assert_eq!(
            (&*w.will.client_id, &*w.will.certificate),
            ("dev-1", "ab12")
        );
        assert!(w.at_ms.abs_diff(clock.now_ms + 30_000) < 5, "{}", w.at_ms);
        assert_eq!(&w.will.message.payload[..], b"gone");
        assert_eq!(w.will.message.properties.message_expiry_interval, Some(90));

        // Left: the time it was left is recorded, and kept when the session is written again.
        let later = WallClock {
            now: clock.now,
            now_ms: clock.now_ms + 5000,
        };
        let left = StoredSession {
            expiry: Duration::from_secs(3600),
            subscriptions: subs,
            connected: false,
        };
        let put = Change::PutSession {
            account: a.clone(),
            client_id: c.clone(),
            session: left,
        };
        s.commit(std::slice::from_ref(&put), clock).unwrap();
        s.commit(&[put], later).unwrap();
        assert_eq!(
            s.load().unwrap().sessions[0].disconnected_at_ms,
            Some(clock.now_ms)
        );
        s.commit(
            &[Change::DeleteSession {
                account: a,
                client_id: c,
            }],
            clock,
        )
        .unwrap();
        let snap = s.load().unwrap();
        assert!(snap.sessions.is_empty());
        let queued: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap();
        assert_eq!(queued, 0, "the queue goes with its session");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_schema_1_database_is_upgraded_and_its_queue_kept() {
        let d = dir("schema1");
        let path = d.join("broker.db");
        {
            // The queue table as schema 1 wrote it, with one stored message.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE sessions (account TEXT NOT NULL, client_id TEXT NOT NULL, \
                 expiry_ms INTEGER NOT NULL, subscriptions BLOB NOT NULL, \
                 disconnected_at_ms INTEGER, PRIMARY KEY (account, client_id)) WITHOUT ROWID;
                 CREATE TABLE queue (account TEXT NOT NULL, client_id TEXT NOT NULL, \
                 seq INTEGER NOT NULL, retain INTEGER NOT NULL, message BLOB NOT NULL, \
                 expires_at_ms INTEGER, timestamp_ms INTEGER NOT NULL, \
                 PRIMARY KEY (account, client_id, seq)) WITHOUT ROWID;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
            let subs = encode_subscriptions(&[]);
            c.execute(
                "INSERT INTO sessions VALUES ('a', 'c', 3600000, ?1, NULL)",
                params![subs],
            )
            .unwrap();
            let bytes = encode_message(&message("t/1", b"old", None)).unwrap();
            c.execute(
                "INSERT INTO queue VALUES ('a', 'c', 3, 1, ?1, NULL, 1)",
                params![bytes],
            )
            .unwrap();
        }
        let mut s = SqliteStorage::open(&path).unwrap();
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA);
        let snap = s.load().unwrap();
        let q = &snap.sessions[0].queue;
        assert_eq!(q.len(), 1);
        assert!(q[0].retain && !q[0].shared && q[0].packet_id.is_none());
        assert_eq!(&q[0].message.message.payload[..], b"old");
        // And the upgraded table takes new rows.
        let clock = WallClock::read();
        s.commit(
            &[Change::Append {
                account: Arc::from("a"),
                client_id: Arc::from("c"),
                seq: 4,
                retain: false,
                shared: true,
                message: message("t/2", b"new", None),
            }],
            clock,
        )
        .unwrap();
        let snap = s.load().unwrap();
        let shared: Vec<bool> = snap.sessions[0].queue.iter().map(|q| q.shared).collect();
        assert_eq!(shared, [false, true]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = dir("schema");
        let path = d.join("broker.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", SCHEMA + 1).unwrap();
        }
        assert!(SqliteStorage::open(&path).is_err());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn subscriptions_round_trip_and_garbage_is_refused() {
        let subs = vec![
            ("x".to_string(), SubscriptionOptions::default()),
            (
                "$share/g/y/#".to_string(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            ),
        ];
        assert_eq!(
            decode_subscriptions(&encode_subscriptions(&subs)).unwrap(),
            subs
        );
        assert!(decode_subscriptions(&[0, 5, b'a']).is_err());
        assert!(decode_subscriptions(&[0]).is_err());
    }
}
