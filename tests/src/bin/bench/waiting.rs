//! What a relayed message costs while many other users' long-polls wait at
//! the receiving gateway. A stored message wakes only its recipients'
//! long-polls, so the figure with them waiting should match the one
//! without (each stored batch used to wake every waiting long-poll).

use std::time::{Duration, Instant};

use tests::Federation;

use crate::{median, run_relay, Figures};

/// Relay rounds at 1 in flight (one message per federation batch, so the
/// wake-ups per message are the most), alternating without and with
/// `waiters` long-polling at B. Returns the median of each.
pub(crate) async fn run(
    fed: &Federation,
    waiters: &[String],
    body: usize,
    secs: f64,
    rounds: usize,
) -> anyhow::Result<(Figures, Figures)> {
    let b = 1;
    let listings = || {
        fed.gateway(b)
            .map_or(0, |g| g.metrics().inbox_listings.get())
    };
    let waiting = || {
        fed.gateway(b)
            .map_or(0, |g| g.metrics().inbox_waiting.get())
    };
    // Long enough to outlast a measured round; short enough that, once the
    // clients are gone, their requests end soon at B too (a long-poll
    // whose client went away waits out its time), so that the next round
    // without waiters really has none.
    let wait = Duration::from_secs_f64(2.0 * secs + 5.0);
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        alone.push(run_relay(fed, 1, body, secs, false).await?);
        let before = listings();
        let mut polls = Vec::with_capacity(waiters.len());
        for w in waiters {
            let api = fed.api(b, w)?;
            polls.push(tokio::spawn(async move {
                loop {
                    if api.inbox(wait).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        // Every one has listed its empty inbox and waits.
        let give_up = Instant::now() + Duration::from_secs(60);
        while listings() < before + waiters.len() as u64 {
            anyhow::ensure!(
                Instant::now() < give_up,
                "only {} of {} long-polls started",
                listings() - before,
                waiters.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = run_relay(fed, 1, body, secs, false).await;
        for p in &polls {
            p.abort();
        }
        beside.push(r?);
        let give_up = Instant::now() + wait + Duration::from_secs(10);
        while waiting() > 0 {
            anyhow::ensure!(
                Instant::now() < give_up,
                "{} long-polls still wait at B",
                waiting()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((median(&alone), median(&beside)))
}
