//! What this client has sent: a local, append-only record in its data
//! directory, so a worker can see where each referral, invitation, reply
//! and message is (`client sent`) without keeping its id, and `client read`
//! can say when one came back undeliverable.
//!
//! The file (`sent.jsonl`) holds one JSON line per message sent, and one
//! more when its status was seen to be final (`acknowledged` or
//! `undeliverable`), so it is not asked for again. Lines are only ever
//! appended; a line that cannot be read (the torn end of a write cut short)
//! is skipped. It names recipients and cases, never content.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use proto::{MessageId, Status};
use serde::{Deserialize, Serialize};

use crate::{Api, ClientError};

/// One message this client sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentEntry {
    /// The message.
    pub message_id: MessageId,
    /// Its recipient's address (`team:duty@southvale`).
    pub to: String,
    /// What it was, for people: `referral`, `case invitation`, `reply`,
    /// `message`, `handover`.
    pub what: String,
    /// The case it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    /// Its category.
    pub category: String,
    /// When it was sent (ms since the Unix epoch).
    pub at_ms: u64,
}

impl SentEntry {
    /// A message sent just now.
    pub fn now(
        message_id: MessageId,
        to: &str,
        what: &str,
        case: Option<&str>,
        category: &proto::Category,
    ) -> SentEntry {
        SentEntry {
            message_id,
            to: to.to_owned(),
            what: what.to_owned(),
            case: case.map(str::to_owned),
            category: category.to_string(),
            at_ms: crate::now_ms(),
        }
    }
}

/// A status seen to be final: it will not change again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalStatus {
    /// The status (`acknowledged` or `undeliverable`).
    pub status: Status,
    /// Why, for `undeliverable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Sent(SentEntry),
    Final {
        message_id: MessageId,
        #[serde(flatten)]
        status: FinalStatus,
    },
}

/// A sent message as recorded: the entry and, once seen, its final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// What was sent.
    pub entry: SentEntry,
    /// Its final status, if one has been seen.
    pub last: Option<FinalStatus>,
}

/// Whether a status will not change again.
pub fn is_final(status: Status) -> bool {
    matches!(status, Status::Acknowledged | Status::Undeliverable)
}

/// The record of what this client sent.
#[derive(Debug, Clone)]
pub struct SentLog {
    path: PathBuf,
}

impl SentLog {
    /// The record in a client's data directory (created on first write).
    pub fn in_dir(data_dir: &Path) -> SentLog {
        SentLog {
            path: data_dir.join("sent.jsonl"),
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Config {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn append(&self, line: &Line) -> Result<(), ClientError> {
        let mut text = serde_json::to_string(line).map_err(|e| self.error(e))?;
        text.push('\n');
        if let Some(dir) = self.path.parent() {
            crate::private_dir(dir).map_err(|e| self.error(e))?;
        }
        let mut options = crate::private_file();
        options.create(true).append(true).read(true);
        let mut f = options.open(&self.path).map_err(|e| self.error(e))?;
        // After a write cut short (a crash, a full disk) the file ends
        // mid-line: end that line first, so this one is whole.
        let len = f.metadata().map_err(|e| self.error(e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(std::io::SeekFrom::Start(len - 1))
                .and_then(|_| f.read_exact(&mut last))
                .map_err(|e| self.error(e))?;
            if last[0] != b'\n' {
                text.insert(0, '\n');
            }
        }
        // One write of the whole line (appended, wherever the cursor is):
        // appends from two clients at once do not interleave.
        f.write_all(text.as_bytes()).map_err(|e| self.error(e))?;
        f.sync_data().map_err(|e| self.error(e))
    }

    /// Records a message sent.
    pub fn record(&self, entry: SentEntry) -> Result<(), ClientError> {
        self.append(&Line::Sent(entry))
    }

    /// Records that a message's status is final.
    pub fn record_final(&self, id: &MessageId, status: FinalStatus) -> Result<(), ClientError> {
        self.append(&Line::Final {
            message_id: id.clone(),
            status,
        })
    }

    /// Every message recorded, oldest first, with its final status if seen.
    /// Lines that cannot be read are skipped (and counted in the log).
    pub fn read(&self) -> Result<Vec<Recorded>, ClientError> {
        let text = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        let mut sent: Vec<Recorded> = Vec::new();
        let mut at: HashMap<MessageId, usize> = HashMap::new();
        let mut unreadable = 0usize;
        for raw in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Line>(raw) {
                Ok(Line::Sent(entry)) => {
                    if !at.contains_key(&entry.message_id) {
                        at.insert(entry.message_id.clone(), sent.len());
                        sent.push(Recorded { entry, last: None });
                    }
                }
                Ok(Line::Final { message_id, status }) => {
                    if let Some(r) = at.get(&message_id).and_then(|i| sent.get_mut(*i)) {
                        r.last = Some(status);
                    }
                }
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                lines = unreadable,
                file = %self.path.display(),
                "skipped unreadable lines of the record of sent messages"
            );
        }
        Ok(sent)
    }
}

/// A recorded message with its status as the gateway gives it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checked {
    /// What was sent.
    pub entry: SentEntry,
    /// Its status (none if the gateway could not say; see `error`).
    pub status: Option<Status>,
    /// Why, for `undeliverable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While `accepted` for another area: why it waits there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<proto::Waiting>,
    /// Its status became final since it was last checked.
    pub newly_final: bool,
    /// The gateway's refusal to say (for example, it does not know it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which open messages (no final status recorded) a check asks the gateway
/// about; the others are left out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// The newest this many (a listing).
    Newest(usize),
    /// This many picked at random: repeated checks (each `read`) reach
    /// every open message in turn, whatever the number of those that never
    /// become final, at a bounded cost each.
    Sample(usize),
}

/// `recorded` without the open messages `ask` leaves out, in order.
fn pick(mut recorded: Vec<Recorded>, ask: Ask) -> Vec<Recorded> {
    let open: Vec<usize> = (0..recorded.len())
        .filter(|i| recorded[*i].last.is_none())
        .collect();
    let keep: std::collections::HashSet<usize> = match ask {
        Ask::Newest(n) => open.iter().rev().take(n).copied().collect(),
        Ask::Sample(n) if n < open.len() => {
            rand::seq::index::sample(&mut rand::thread_rng(), open.len(), n)
                .into_iter()
                .map(|k| open[k])
                .collect()
        }
        Ask::Sample(_) => open.iter().copied().collect(),
    };
    let mut i = 0;
    recorded.retain(|r| {
        let kept = r.last.is_some() || keep.contains(&i);
        i += 1;
        kept
    });
    recorded
}

/// The messages recorded as sent at or after `since_ms`, oldest first, with
/// their status: a final one from the record, the open ones the gateway is
/// asked about (see [`Ask`]; a status newly final is recorded, so it is not
/// asked for again). With `open_only`, messages already recorded as final
/// are left out. A gateway that cannot be reached fails the whole check.
pub async fn check(
    log: &SentLog,
    api: &Api,
    since_ms: u64,
    open_only: bool,
    ask: Ask,
) -> Result<Vec<Checked>, ClientError> {
    let recorded: Vec<Recorded> = log
        .read()?
        .into_iter()
        .filter(|r| r.entry.at_ms >= since_ms && !(open_only && r.last.is_some()))
        .collect();
    let recorded = pick(recorded, ask);
    let mut out = Vec::with_capacity(recorded.len());
    for Recorded { entry, last } in recorded {
        if let Some(last) = last {
            out.push(Checked {
                entry,
                status: Some(last.status),
                reason: last.reason,
                waiting: None,
                newly_final: false,
                error: None,
            });
            continue;
        }
        match api.status(&entry.message_id).await {
            Ok(s) => {
                let reason = s
                    .history
                    .iter()
                    .rev()
                    .find(|e| e.status == s.status)
                    .and_then(|e| e.reason.clone());
                let newly_final = is_final(s.status);
                if newly_final {
                    let seen = FinalStatus {
                        status: s.status,
                        reason: reason.clone(),
                    };
                    if let Err(e) = log.record_final(&entry.message_id, seen) {
                        tracing::warn!(error = %e, "could not record a final status");
                    }
                }
                out.push(Checked {
                    entry,
                    status: Some(s.status),
                    reason,
                    waiting: s.waiting,
                    newly_final,
                    error: None,
                });
            }
            Err(e @ ClientError::Api { .. }) => out.push(Checked {
                entry,
                status: None,
                reason: None,
                waiting: None,
                newly_final: false,
                error: Some(e.to_string()),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
