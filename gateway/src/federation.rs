//! Outbound federation: one worker per peer drains that peer's queue, in
//! order, in batches, retrying with exponential backoff and jitter.
//!
//! Invariant: an item leaves the queue only after the peer answered for it
//! (stored, duplicate or refused), so a crash on either side can repeat a
//! batch but never lose or reorder one; the peer deduplicates repeats.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::{FederationBatch, FederationBatchResponse, FederationItem, ItemResult};
use rand::Rng;
use tokio::sync::Notify;

use crate::config::PeerConfig;
use crate::store::{Sent, Store};
use crate::{now_ms, Shared};

/// Largest total body size packed into one federation batch.
pub(crate) const BATCH_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Why a batch could not be handed over (the batch stays queued).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("{0}")]
    Http(String),
    #[error("peer answered HTTP {0}")]
    Status(u16),
    #[error("peer asked us to slow down")]
    RateLimited(Option<Duration>),
    #[error("peer's answer does not match the batch: {0}")]
    BadAnswer(String),
}

fn describe(e: &reqwest::Error) -> String {
    // reqwest's Display hides the cause; walk the chain for the TLS or socket error.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Runs one peer's worker until shutdown.
pub(crate) async fn peer_worker(
    shared: Arc<Shared>,
    peer: PeerConfig,
    client: reqwest::Client,
    wake: Arc<Notify>,
) {
    let delivery = shared.config.delivery.clone();
    let base = peer.url.trim_end_matches('/').to_owned();
    // Framed batches carry bodies raw; a peer that predates them answers 404
    // and is sent JSON from then on.
    let mut framed = true;
    let mut stop = shared.stop.subscribe();
    let mut backoff = delivery.retry_initial;
    let mut last_error: Option<String> = None;
    // Highest queue position the peer has answered for. Items up to it are
    // being removed from the queue by `recording`; after a failure to record
    // (or a restart) the cursor goes back to 0 and the peer deduplicates.
    let mut cursor: i64 = 0;
    let record_failed = Arc::new(AtomicBool::new(false));
    let mut recording: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_expiry = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        if *stop.borrow() {
            break;
        }
        if record_failed.swap(false, Ordering::SeqCst) {
            cursor = 0;
        }
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            last_expiry = tokio::time::Instant::now();
            let reason = format!(
                "not delivered to {} within its validity of {}{}",
                peer.area,
                humantime::format_duration(delivery.message_validity),
                last_error
                    .as_deref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
            match shared
                .store
                .expire(peer.area.clone(), cursor, now_ms(), reason)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    shared.metrics.undeliverable.add(n as u64);
                    tracing::warn!(
                        count = n,
                        "messages expired undelivered; their senders are told"
                    );
                }
                Err(e) => tracing::error!(error = %e, "expiring messages failed"),
            }
        }
        let batch = match shared
            .store
            .queued(peer.area.clone(), cursor, delivery.batch_max_items)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading the queue failed");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = crate::stopped(&mut stop) => break,
            }
            continue;
        }
        // Pack items until the byte budget is reached (at least one).
        let mut size = 0;
        let mut take = 0;
        for q in &batch {
            if let FederationItem::Deliver { body, .. } = &q.item {
                size += body.len();
            }
            if take > 0 && size > BATCH_MAX_BYTES {
                break;
            }
            take += 1;
        }
        let batch = &batch[..take];
        match send(&client, &base, &mut framed, batch).await {
            Ok(answer) => {
                backoff = delivery.retry_initial;
                if last_error.take().is_some() {
                    tracing::info!("peer reachable again");
                }
                let mut verdicts = Vec::with_capacity(batch.len());
                for (q, r) in batch.iter().zip(answer.results) {
                    cursor = cursor.max(q.seq);
                    verdicts.push((
                        q.seq,
                        match r {
                            ItemResult::Stored | ItemResult::Duplicate => Sent::Accepted,
                            ItemResult::Rejected { code, reason } => {
                                tracing::warn!(?code, %reason, "peer refused an item");
                                shared.metrics.undeliverable.inc();
                                Sent::Refused(reason)
                            }
                        },
                    ));
                }
                shared
                    .metrics
                    .federation_items_sent
                    .add(verdicts.len() as u64);
                // Record while the next batch is on its way; one recording at a time.
                if let Some(h) = recording.take() {
                    let _ = h.await;
                }
                let (shared2, area, failed) =
                    (shared.clone(), peer.area.clone(), record_failed.clone());
                recording = Some(tokio::spawn(async move {
                    if let Err(e) = shared2.store.sent(area, verdicts, now_ms()).await {
                        tracing::error!(error = %e, "recording a delivered batch failed; it will be resent and deduplicated");
                        failed.store(true, Ordering::SeqCst);
                    }
                }));
            }
            Err(e) => {
                shared.metrics.federation_failures.inc();
                let wait = match &e {
                    SendError::RateLimited(Some(after)) => *after,
                    _ => {
                        let w = jitter(backoff);
                        backoff = (backoff * 2).min(delivery.retry_max);
                        w
                    }
                };
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, queued = batch.len(), "federation send failed");
                last_error = Some(e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::stopped(&mut stop) => break,
                }
            }
        }
    }
    if let Some(h) = recording.take() {
        let _ = h.await;
    }
}

/// Full jitter between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    framed: &mut bool,
    batch: &[crate::store::Queued],
) -> Result<FederationBatchResponse, SendError> {
    let n = batch.len();
    let post = |framed: bool| {
        let req = if framed {
            client
                .post(format!("{base}/v1/federation/frames"))
                .header(reqwest::header::CONTENT_TYPE, proto::frame::FRAMED)
                .body(proto::frame::encode_items(batch.iter().map(|q| &q.item)))
        } else {
            client
                .post(format!("{base}/v1/federation/batch"))
                .json(&FederationBatch {
                    items: batch.iter().map(|q| q.item.clone()).collect(),
                })
        };
        async move { req.send().await.map_err(|e| SendError::Http(describe(&e))) }
    };
    let mut resp = post(*framed).await?;
    if *framed && resp.status() == reqwest::StatusCode::NOT_FOUND {
        tracing::info!("peer does not accept framed batches; sending JSON");
        *framed = false;
        resp = post(false).await?;
    }
    let status = resp.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(SendError::RateLimited(after));
    }
    if !status.is_success() {
        return Err(SendError::Status(status.as_u16()));
    }
    let answer: FederationBatchResponse = resp
        .json()
        .await
        .map_err(|e| SendError::BadAnswer(describe(&e)))?;
    if answer.results.len() != n {
        return Err(SendError::BadAnswer(format!(
            "{} results for {n} items",
            answer.results.len()
        )));
    }
    Ok(answer)
}
