//! The storage part of a relay alone: two `SqliteStore`s (sender and
//! receiver) in a temporary directory, driven through the `Store` trait the
//! way the gateways drive them (submit; queue read; the peer's batch commit;
//! recording the answer), without TLS or HTTP. It shows what share of the
//! relay's cost is storage.

use std::time::{Duration, Instant};

use gateway::store::{Incoming, Mailbox, NewMessage, Route, Sent, SqliteStore, Store};
use proto::{AreaId, Body, Envelope, FederationItem, MessageId, Sender, UserId};

use crate::{cpu_time, figures, now_us, Figures};

fn envelope(w: usize, body: &Body) -> anyhow::Result<Envelope> {
    let now = u64::try_from(now_us() / 1000)?;
    Ok(Envelope {
        message_id: MessageId::time_ordered(now, rand::random()),
        idempotency_key: client::fresh_idempotency_key(),
        sender: Sender {
            area: AreaId::new("northshire")?,
            user: UserId::new(format!("s{w}"))?,
        },
        recipient: format!("user:r{w}@southvale").parse()?,
        category: proto::Category::new("relocation")?,
        urgent: false,
        kind: proto::MessageKind::Opaque,
        disclosure: None,
        content_hash: body.hash(),
        accepted_at_ms: now,
        expires_at_ms: now + 86_400_000,
    })
}

/// `c` submitters against the sending store while one loop forwards its
/// queue to the receiving store in batches of up to 256, as the federation
/// worker does. Latency runs from submit to the receiver's commit.
pub(crate) async fn run(c: usize, body: usize, secs: f64) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let a = SqliteStore::open(&dir.path().join("a"), AreaId::new("northshire")?)?;
    let b = SqliteStore::open(&dir.path().join("b"), AreaId::new("southvale")?)?;
    let peer = AreaId::new("southvale")?;
    let from = AreaId::new("northshire")?;
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..c {
        let a = a.clone();
        let peer = peer.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let body = Body(vec![b's'; body]);
                let envelope = envelope(w, &body)?;
                a.submit(NewMessage {
                    envelope,
                    body,
                    route: Route::Peer(peer.clone()),
                    commit: None,
                    accept_new: true,
                })
                .await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut lat = Vec::new();
    let mut cursor = 0;
    let mut submitters_done = false;
    loop {
        let batch = a.queued(peer.clone(), cursor, 256).await?;
        if batch.is_empty() {
            if submitters_done {
                break;
            }
            submitters_done = tasks.iter().all(|t| t.is_finished());
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut items = Vec::with_capacity(batch.len());
        let mut sent_at = Vec::with_capacity(batch.len());
        for q in &batch {
            if let FederationItem::Deliver { envelope, body } = &q.item {
                sent_at.push(envelope.accepted_at_ms);
                items.push(Incoming::Deliver(envelope.clone(), body.clone()));
            }
        }
        b.accept_batch(from.clone(), items).await?;
        let stored = now_us() / 1000;
        lat.extend(sent_at.iter().map(|t| (stored - *t as i64) * 1000));
        cursor = batch.last().map(|q| q.seq).unwrap_or(cursor);
        let verdicts = batch.iter().map(|q| (q.seq, Sent::Accepted)).collect();
        a.sent(peer.clone(), verdicts, u64::try_from(stored)?)
            .await?;
    }
    let mut n = 0;
    for t in tasks {
        n += t.await??;
    }
    anyhow::ensure!(
        lat.len() == n,
        "{} of {n} messages reached the receiver",
        lat.len()
    );
    let mut f = figures(lat, start.elapsed());
    f.cpu_us = (cpu_time() - cpu).as_secs_f64() * 1e6 / n.max(1) as f64;
    Ok(f)
}

/// A receiving store of its own whose inbox holds `waiting` messages after
/// `history` acknowledged ones.
async fn inbox_with_history(
    dir: &std::path::Path,
    history: usize,
    waiting: usize,
) -> anyhow::Result<SqliteStore> {
    let b = SqliteStore::open(dir, AreaId::new("southvale")?)?;
    let from = AreaId::new("northshire")?;
    let mb = reader()?;
    let body = Body(vec![b'l'; 256]);
    let mut ids = Vec::with_capacity(history + waiting);
    let mut left = history + waiting;
    while left > 0 {
        let n = left.min(256);
        left -= n;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let env = envelope(0, &body)?;
            ids.push(env.message_id.clone());
            items.push(Incoming::Deliver(Box::new(env), body.clone()));
        }
        b.accept_batch(from.clone(), items).await?;
    }
    let now = u64::try_from(now_us() / 1000)?;
    for chunk in ids[..history].chunks(256) {
        let acks = chunk.iter().map(|id| b.ack(mb.clone(), id.clone(), now));
        futures::future::try_join_all(acks).await?;
    }
    Ok(b)
}

/// The mailbox the listing figure lists.
fn reader() -> anyhow::Result<Mailbox> {
    Ok(Mailbox {
        user: UserId::new("r0")?,
        teams: Vec::new(),
    })
}

/// Median times, in microseconds, to list an inbox that has `waiting`
/// messages after `history` acknowledged ones, and one with none before
/// them (each listing asks for up to 100). Each is a store of its own;
/// their listings alternate, so a noisy moment hits both.
pub(crate) async fn listing(history: usize, waiting: usize) -> anyhow::Result<(f64, f64)> {
    let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let long = inbox_with_history(d1.path(), history, waiting).await?;
    let short = inbox_with_history(d2.path(), 0, waiting).await?;
    // Let the writers' bulk pass index the newest rows, as it would have.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mb = reader()?;
    let mut times = [Vec::with_capacity(200), Vec::with_capacity(200)];
    for _ in 0..200 {
        for (store, t) in [&long, &short].into_iter().zip(times.iter_mut()) {
            let start = Instant::now();
            let listed = store.inbox(mb.clone(), 100).await?;
            t.push(start.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(
                listed.len() == waiting.min(100),
                "listed {} of {waiting} waiting messages",
                listed.len()
            );
        }
    }
    let [mut a, mut b] = times;
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    Ok((a[a.len() / 2], b[b.len() / 2]))
}
