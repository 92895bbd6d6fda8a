//! The framed encoding of message-carrying requests: a JSON head and the raw
//! body side by side, so a body is neither base64-encoded nor scanned as a
//! JSON string on its way through a gateway.
//!
//! A framed request (media type [`FRAMED`]) is a sequence of records:
//!
//! ```text
//! record := head_len:u32be head:[u8; head_len] body_len:u32be body:[u8; body_len]
//! ```
//!
//! The head is the JSON of the request with its `body` field empty (`""`);
//! the record's body takes its place. `POST /v1/messages` carries one record
//! (a [`SubmitRequest`]); `POST /v1/federation/frames` carries one record per
//! [`FederationItem`], in queue order.
//!
//! Parsing is sans-I/O and total: every malformed input gives a typed
//! [`FrameError`], never a panic.

use serde::Serialize;

use crate::{Body, Envelope, FederationItem, SubmitRequest};

/// Media type of framed requests.
pub const FRAMED: &str = "application/vnd.gateway.frames";

/// Request header naming the sender's federation session (a random
/// number, in decimal) when it pipelines batches; see [`BATCH_HEADER`].
pub const SESSION_HEADER: &str = "x-federation-session";

/// Request header numbering a batch within its session (1, 2, 3, …). A
/// receiver that honours it stores batch `k` only after batch `k − 1` of the
/// same session, and says so with [`ORDERED_HEADER`] in its answer; a sender
/// keeps at most one batch on the wire until it has seen that.
pub const BATCH_HEADER: &str = "x-federation-batch";

/// Answer header (value `1`): the batch was taken in session order.
pub const ORDERED_HEADER: &str = "x-federation-ordered";

/// Largest head accepted (a head is an envelope or a request's metadata).
pub const MAX_HEAD: usize = 64 * 1024;

/// Why a framed request could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The input ends inside a record.
    #[error("frame record {record} is truncated")]
    Truncated {
        /// Index of the record.
        record: usize,
    },
    /// A head is larger than [`MAX_HEAD`].
    #[error("frame record {record}: head of {len} bytes exceeds {MAX_HEAD}")]
    HeadTooLarge {
        /// Index of the record.
        record: usize,
        /// Its declared length.
        len: usize,
    },
    /// A head is not the expected JSON.
    #[error("frame record {record}: malformed head: {reason}")]
    Head {
        /// Index of the record.
        record: usize,
        /// The JSON error.
        reason: String,
    },
    /// A head carries a body of its own, or a record without a body has one.
    #[error("frame record {record}: {reason}")]
    Body {
        /// Index of the record.
        record: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The number of records is not what the request allows.
    #[error("expected {expected} frame record(s), found {found}")]
    Count {
        /// What was expected.
        expected: &'static str,
        /// How many there were.
        found: usize,
    },
}

/// One record: a head and a body, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The JSON head.
    pub head: &'a [u8],
    /// The raw body.
    pub body: &'a [u8],
}

/// Splits framed input into records, checking every length.
pub fn records(mut input: &[u8]) -> Result<Vec<Record<'_>>, FrameError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let record = out.len();
        let (head, rest) = take(input, record, Some(MAX_HEAD))?;
        let (body, rest) = take(rest, record, None)?;
        out.push(Record { head, body });
        input = rest;
    }
    Ok(out)
}

fn take(input: &[u8], record: usize, max: Option<usize>) -> Result<(&[u8], &[u8]), FrameError> {
    let (len, rest) = input
        .split_first_chunk::<4>()
        .ok_or(FrameError::Truncated { record })?;
    let len = u32::from_be_bytes(*len) as usize;
    if let Some(max) = max {
        if len > max {
            return Err(FrameError::HeadTooLarge { record, len });
        }
    }
    if rest.len() < len {
        return Err(FrameError::Truncated { record });
    }
    Ok(rest.split_at(len))
}

/// Appends one record to `out`.
pub fn push_record(out: &mut Vec<u8>, head: &[u8], body: &[u8]) {
    // Heads are bounded by MAX_HEAD and bodies by the gateways' body limit,
    // both far below 4 GiB; saturate rather than wrap on absurd input.
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len(head.len()));
    out.extend_from_slice(head);
    out.extend_from_slice(&len(body.len()));
    out.extend_from_slice(body);
}

fn head_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain data types to a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse_head<T: serde::de::DeserializeOwned>(record: usize, head: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(head).map_err(|e| FrameError::Head {
        record,
        reason: e.to_string(),
    })
}

const HEAD_HAS_BODY: &str = "the head's body must be empty: the body follows the head";

/// Encodes a submission as one record.
pub fn encode_submit(req: &SubmitRequest) -> Vec<u8> {
    #[derive(Serialize)]
    struct Head<'a> {
        idempotency_key: &'a crate::IdempotencyKey,
        recipient: &'a crate::Recipient,
        category: &'a crate::Category,
        urgent: bool,
        kind: crate::MessageKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        disclosure: Option<&'a crate::Disclosure>,
        #[serde(skip_serializing_if = "Option::is_none")]
        commit_proof: Option<&'a crate::CommitProof>,
        body: &'static str,
    }
    // Destructured in full, so a new request field cannot be left out of the head.
    let SubmitRequest {
        idempotency_key,
        recipient,
        category,
        urgent,
        kind,
        disclosure,
        commit_proof,
        body,
    } = req;
    let head = head_json(&Head {
        idempotency_key,
        recipient,
        category,
        urgent: *urgent,
        kind: *kind,
        disclosure: disclosure.as_ref(),
        commit_proof: commit_proof.as_ref(),
        body: "",
    });
    let mut out = Vec::with_capacity(8 + head.len() + body.len());
    push_record(&mut out, &head, &body.0);
    out
}

/// Decodes a framed submission (exactly one record).
pub fn decode_submit(input: &[u8]) -> Result<SubmitRequest, FrameError> {
    let recs = records(input)?;
    let [rec] = recs.as_slice() else {
        return Err(FrameError::Count {
            expected: "1",
            found: recs.len(),
        });
    };
    let mut req: SubmitRequest = parse_head(0, rec.head)?;
    if !req.body.is_empty() {
        return Err(FrameError::Body {
            record: 0,
            reason: HEAD_HAS_BODY,
        });
    }
    req.body = Body(rec.body.to_vec());
    Ok(req)
}

/// Encodes federation items, one record each.
pub fn encode_items<'a>(items: impl IntoIterator<Item = &'a FederationItem>) -> Vec<u8> {
    #[derive(Serialize)]
    struct DeliverHead<'a> {
        kind: &'static str,
        envelope: &'a Envelope,
        body: &'static str,
    }
    let mut out = Vec::new();
    for item in items {
        match item {
            FederationItem::Deliver { envelope, body } => {
                let head = head_json(&DeliverHead {
                    kind: "deliver",
                    envelope,
                    body: "",
                });
                push_record(&mut out, &head, &body.0);
            }
            other => push_record(&mut out, &head_json(other), &[]),
        }
    }
    out
}

/// Decodes framed federation items (at least one, at most `max`).
pub fn decode_items(input: &[u8], max: usize) -> Result<Vec<FederationItem>, FrameError> {
    decode_each_item(input, max)?.into_iter().collect()
}

/// As [`decode_items`], but a record whose head cannot be read (a kind or
/// field from another version, say), or whose body does not belong, is an
/// error of that item alone; only a batch whose framing is broken, or that
/// holds no records or more than `max`, fails whole.
pub fn decode_each_item(
    input: &[u8],
    max: usize,
) -> Result<Vec<Result<FederationItem, FrameError>>, FrameError> {
    let recs = records(input)?;
    if recs.is_empty() || recs.len() > max {
        return Err(FrameError::Count {
            expected: "between 1 and the batch limit",
            found: recs.len(),
        });
    }
    Ok(recs
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            let mut item: FederationItem = parse_head(i, rec.head)?;
            match &mut item {
                FederationItem::Deliver { body, .. } => {
                    if !body.is_empty() {
                        return Err(FrameError::Body {
                            record: i,
                            reason: HEAD_HAS_BODY,
                        });
                    }
                    *body = Body(rec.body.to_vec());
                }
                _ if !rec.body.is_empty() => {
                    return Err(FrameError::Body {
                        record: i,
                        reason: "only a delivery carries a body",
                    })
                }
                _ => {}
            }
            Ok(item)
        })
        .collect())
}

#[cfg(test)]
mod tests;
