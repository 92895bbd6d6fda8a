//! The client's MLS state on disk: one SQLite file, `<data_dir>/mls.sqlite3`.
//!
//! Invariant: every state-changing operation of [`super::MlsClient`] ends in
//! exactly one call to [`Store::commit`], which writes, in one transaction,
//! the rows of openmls's key/value storage that changed since the last commit
//! plus the operation's own rows (group list, history, message digests). A
//! crash therefore leaves the file either before or after the operation,
//! never in between.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{GroupId, HistoryEntry, MlsError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    group_id BLOB PRIMARY KEY,
    case_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    sender TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    plaintext BLOB NOT NULL,
    imported_from TEXT,
    digest BLOB NOT NULL,
    UNIQUE (group_id, sender, at_ms, digest)
);
CREATE INDEX IF NOT EXISTS history_by_group ON history (group_id, at_ms, id);
CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, own INTEGER NOT NULL, via TEXT);
CREATE TABLE IF NOT EXISTS copies (digest BLOB NOT NULL, via TEXT NOT NULL, PRIMARY KEY (digest, via));
CREATE TABLE IF NOT EXISTS welcomes (digest BLOB PRIMARY KEY, group_id BLOB NOT NULL);
";

/// What a message digest in the `seen` table means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// We produced this message (an echo from the delivery service is ours).
    Own,
    /// We already processed this message from someone else.
    Inbound,
}

/// A row change that rides along with the openmls state in one transaction.
#[derive(Debug)]
pub(super) enum Change {
    /// A group we now belong to, and the digest of the Welcome we joined
    /// it by (none for one we made).
    Group {
        group: GroupId,
        case_id: String,
        created_ms: u64,
        welcome: Option<[u8; 32]>,
    },
    /// A chronology entry (duplicates by sender, time and content are ignored).
    History { group: GroupId, entry: HistoryEntry },
    /// A message digest we have seen, and the address it came by.
    Seen {
        digest: [u8; 32],
        kind: Seen,
        via: Option<String>,
    },
    /// A message seen before, come again by another of our addresses.
    Copy { digest: [u8; 32], via: String },
    /// A metadata value.
    Meta { key: &'static str, value: Vec<u8> },
}

/// The SQLite file plus the last committed copy of openmls's key/value map.
#[derive(Debug)]
pub(super) struct Store {
    conn: Connection,
    persisted: HashMap<Vec<u8>, Vec<u8>>,
}

fn db(e: rusqlite::Error) -> MlsError {
    MlsError::Storage(e.to_string())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/mls.sqlite3`.
    pub(super) fn open(data_dir: &Path) -> Result<Store, MlsError> {
        crate::private_dir(data_dir)
            .map_err(|e| MlsError::Storage(format!("{}: {e}", data_dir.display())))?;
        // Created owner-only before SQLite opens it: its WAL and shared
        // memory files take the database file's mode.
        let path = data_dir.join("mls.sqlite3");
        crate::private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| MlsError::Storage(format!("{}: {e}", path.display())))?;
        for file in [
            "mls.sqlite3",
            "mls.sqlite3-wal",
            "mls.sqlite3-shm",
            "cases.json",
            "language-confirmations.jsonl",
            "sent.jsonl",
        ] {
            let file = data_dir.join(file);
            crate::make_private(&file)
                .map_err(|e| MlsError::Storage(format!("{}: {e}", file.display())))?;
        }
        let conn = Connection::open(&path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        // Files from before `via` was kept: added, empty for what they saw.
        if conn.prepare("SELECT via FROM seen LIMIT 0").is_err() {
            conn.execute_batch("ALTER TABLE seen ADD COLUMN via TEXT")
                .map_err(db)?;
        }
        let mut persisted = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT key, value FROM kv").map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(db)?;
            for row in rows {
                let (k, v) = row.map_err(db)?;
                persisted.insert(k, v);
            }
        }
        Ok(Store { conn, persisted })
    }

    /// The connection, for tests that simulate a damaged file.
    #[cfg(test)]
    pub(super) fn conn_for_tests(&self) -> &Connection {
        &self.conn
    }

    /// The openmls key/value map as last committed.
    pub(super) fn persisted(&self) -> &HashMap<Vec<u8>, Vec<u8>> {
        &self.persisted
    }

    /// A metadata value.
    pub(super) fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, MlsError> {
        self.conn
            .query_row("SELECT v FROM meta WHERE k = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    /// All groups with their case ids, in creation order.
    pub(super) fn groups(&self) -> Result<Vec<(GroupId, String)>, MlsError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT group_id, case_id FROM groups ORDER BY created_ms, rowid")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((GroupId(r.get::<_, Vec<u8>>(0)?), r.get::<_, String>(1)?))
            })
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    /// Whether we have seen a message with this digest, and how.
    /// Whether a copy of the message `digest` came by `via` before.
    pub(super) fn copy_seen(&self, digest: &[u8; 32], via: &str) -> Result<bool, MlsError> {
        self.conn
            .prepare_cached("SELECT 1 FROM copies WHERE digest = ?1 AND via = ?2")
            .map_err(db)?
            .query_row(params![&digest[..], via], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(db)
    }

    /// Whether we have seen a message digest, and the address it came by
    /// (when it came from someone else, by a known address).
    /// The group we joined by the Welcome with this digest, if we did.
    pub(super) fn joined_by(&self, digest: &[u8; 32]) -> Result<Option<GroupId>, MlsError> {
        let group: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT group_id FROM welcomes WHERE digest = ?1")
            .map_err(db)?
            .query_row([&digest[..]], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(group.map(GroupId))
    }

    pub(super) fn seen(
        &self,
        digest: &[u8; 32],
    ) -> Result<Option<(Seen, Option<String>)>, MlsError> {
        let row: Option<(i64, Option<String>)> = self
            .conn
            .prepare_cached("SELECT own, via FROM seen WHERE digest = ?1")
            .map_err(db)?
            .query_row([&digest[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        Ok(row.map(|(own, via)| {
            let kind = if own != 0 { Seen::Own } else { Seen::Inbound };
            (kind, via)
        }))
    }

    /// A group's chronology, oldest first.
    pub(super) fn history(&self, group: &GroupId) -> Result<Vec<HistoryEntry>, MlsError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT epoch, sender, at_ms, plaintext, imported_from FROM history
                 WHERE group_id = ?1 ORDER BY at_ms, id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([&group.0], |r| {
                Ok(HistoryEntry {
                    epoch: to_u64(r.get(0)?),
                    sender: r.get(1)?,
                    at_ms: to_u64(r.get(2)?),
                    plaintext: r.get(3)?,
                    imported_from: r.get(4)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    /// Writes, in one transaction, the difference between `current` (the
    /// provider's key/value map now) and the last committed map, plus
    /// `changes`. Returns how many history rows were new (not duplicates).
    /// On error nothing is written and the committed copy is unchanged.
    pub(super) fn commit(
        &mut self,
        current: &HashMap<Vec<u8>, Vec<u8>>,
        changes: &[Change],
    ) -> Result<usize, MlsError> {
        let upserts: Vec<(&Vec<u8>, &Vec<u8>)> = current
            .iter()
            .filter(|(k, v)| self.persisted.get(*k) != Some(*v))
            .collect();
        let deletes: Vec<&Vec<u8>> = self
            .persisted
            .keys()
            .filter(|k| !current.contains_key(*k))
            .collect();
        let tx = self.conn.transaction().map_err(db)?;
        let mut new_history = 0;
        {
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)")
                .map_err(db)?;
            for (k, v) in &upserts {
                put.execute(params![k, v]).map_err(db)?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM kv WHERE key = ?1")
                .map_err(db)?;
            for k in &deletes {
                del.execute([k]).map_err(db)?;
            }
            for change in changes {
                match change {
                    Change::Group {
                        group,
                        case_id,
                        created_ms,
                        welcome,
                    } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO groups (group_id, case_id, created_ms)
                             VALUES (?1, ?2, ?3)",
                            params![group.0, case_id, to_i64(*created_ms)],
                        )
                        .map_err(db)?;
                        if let Some(digest) = welcome {
                            tx.execute(
                                "INSERT OR REPLACE INTO welcomes (digest, group_id) VALUES (?1, ?2)",
                                params![&digest[..], group.0],
                            )
                            .map_err(db)?;
                        }
                    }
                    Change::History { group, entry } => {
                        let digest = super::sha256(&entry.plaintext);
                        new_history += tx
                            .prepare_cached(
                                "INSERT OR IGNORE INTO history
                                 (group_id, epoch, sender, at_ms, plaintext, imported_from, digest)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            )
                            .map_err(db)?
                            .execute(params![
                                group.0,
                                to_i64(entry.epoch),
                                entry.sender,
                                to_i64(entry.at_ms),
                                entry.plaintext,
                                entry.imported_from,
                                &digest[..],
                            ])
                            .map_err(db)?;
                    }
                    Change::Seen { digest, kind, via } => {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO seen (digest, own, via) VALUES (?1, ?2, ?3)",
                        )
                        .map_err(db)?
                        .execute(params![&digest[..], i64::from(*kind == Seen::Own), via])
                        .map_err(db)?;
                    }
                    Change::Copy { digest, via } => {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO copies (digest, via) VALUES (?1, ?2)",
                        )
                        .map_err(db)?
                        .execute(params![&digest[..], via])
                        .map_err(db)?;
                    }
                    Change::Meta { key, value } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)",
                            params![key, value],
                        )
                        .map_err(db)?;
                    }
                }
            }
        }
        tx.commit().map_err(db)?;
        let upserts: Vec<(Vec<u8>, Vec<u8>)> = upserts
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes: Vec<Vec<u8>> = deletes.into_iter().cloned().collect();
        for k in deletes {
            self.persisted.remove(&k);
        }
        self.persisted.extend(upserts);
        Ok(new_history)
    }
}
