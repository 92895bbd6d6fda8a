//! Relay benchmark: A→B through two real gateways (mTLS, SQLite with
//! synchronous=FULL, federation batches), against a plain rustls+hyper mTLS
//! echo server measured in the same run on the same machine.
//!
//! Run: `cargo run --release -p tests --bin bench` (add `-- --help` for options).
//! Prints throughput, p50/p99 latency and CPU time per message at each
//! concurrency (medians over rounds that alternate echo and relay), and the
//! ratio relay/echo. Nothing here asserts a time: the figures are for people.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use tests::{message, Federation, Settings};

mod link;
mod mls;
mod store;
mod waiting;

/// The allocator the `gateway` binary uses, so the gateways measured here
/// allocate as deployed ones do.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure A→B relay throughput and latency against a plain mTLS echo.
#[derive(Debug, Parser)]
struct Args {
    /// Messages in flight (concurrent senders), comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Body size in bytes.
    #[arg(long, default_value_t = 4096)]
    body: usize,
    /// Also measure client-side MLS costs (referral creation, follow-up) against raw openmls.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    mls: bool,
    /// Rounds for the MLS measurements.
    #[arg(long, default_value_t = 20)]
    mls_rounds: usize,
    /// Skip the echo baseline (for profiling the relay alone).
    #[arg(long)]
    relay_only: bool,
    /// Measure only the storage part (two stores driven directly, no network).
    #[arg(long)]
    store_only: bool,
    /// Measure only acceptance at A (B is not started; the relay columns
    /// then show A's answers to the senders), to split the relay's cost.
    #[arg(long)]
    accept_only: bool,
    /// Federation batches on the wire to the peer at once (the gateway's
    /// `delivery.batches_in_flight`).
    #[arg(long, default_value_t = 4)]
    batches_in_flight: usize,
    /// One-way delay, in milliseconds, added to the link between gateway A
    /// and gateway B (a relay on loopback holds every chunk that long), to
    /// see the relay over an inter-area round trip; the senders' link to A
    /// stays direct.
    #[arg(long, default_value_t = 0)]
    link_delay_ms: u64,
    /// Seconds to spend on each measurement (after warm-up).
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Acknowledged messages in an inbox's history for the listing figure
    /// (0 skips it): a listing should cost the same however long the
    /// history is.
    #[arg(long, default_value_t = 20_000)]
    inbox_history: usize,
    /// Other users' long-polls waiting at B for the wake-up figure (0
    /// skips it): a relayed message should cost the same with them waiting.
    #[arg(long, default_value_t = 1000)]
    waiting_polls: usize,
    /// Rounds per concurrency, echo and relay alternating; the table shows
    /// the median of each column, so one noisy moment on a shared machine
    /// does not decide the figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The median of each figure over several rounds.
fn median(rounds: &[Figures]) -> Figures {
    let mid = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Figures {
        per_sec: mid(|f| f.per_sec),
        p50_ms: mid(|f| f.p50_ms),
        p99_ms: mid(|f| f.p99_ms),
        n: rounds.iter().map(|f| f.n).sum(),
        cpu_us: mid(|f| f.cpu_us),
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    n: usize,
    /// CPU time (all threads of this process) per message, in microseconds.
    cpu_us: f64,
}

/// Share of the machine's CPUs a measurement kept busy, in percent: its
/// CPU time per message times its messages per second.
fn busy(f: &Figures, cores: usize) -> f64 {
    100.0 * f.cpu_us * f.per_sec / 1e6 / cores.max(1) as f64
}

/// CPU time the calling thread has used so far, from /proc (its run time
/// in nanoseconds); zero where that is not available.
fn thread_cpu_time() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or(Duration::ZERO)
}

/// CPU time this process has used so far (user + system), from /proc; zero
/// where /proc is not available.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Linux reports these in USER_HZ, which is 100 on every supported platform.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn figures(mut lat_us: Vec<i64>, elapsed: Duration) -> Figures {
    lat_us.sort_unstable();
    let pick = |q: f64| {
        if lat_us.is_empty() {
            return 0.0;
        }
        let i = ((lat_us.len() as f64 - 1.0) * q).round() as usize;
        lat_us[i.min(lat_us.len() - 1)] as f64 / 1000.0
    };
    Figures {
        per_sec: lat_us.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        n: lat_us.len(),
        cpu_us: 0.0,
    }
}

// === echo baseline ===

/// A plain hyper server over rustls with the same mTLS configuration the gateway uses.
async fn start_echo(fed: &Federation) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let handle = tests::serve_as_gateway(fed, 0, listener, |req| async move {
        hyper::Response::new(Full::new(tests::body_bytes(req).await))
    })?;
    Ok((port, handle))
}

async fn run_echo(
    fed: &Federation,
    port: u16,
    c: usize,
    body: usize,
    secs: f64,
) -> anyhow::Result<Figures> {
    let config = client::ClientConfig::load(&fed.client_config_path(0, "s0"))?;
    let creds = certs::Credentials::load(&config.cert, &config.key)?;
    let tls = certs::user_client_config(&creds, &config.area, &certs::load_certs(&config.ca)?)?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let url = format!("https://127.0.0.1:{port}/echo");
    let payload = Bytes::from(vec![b'e'; body]);
    let run = |dur: Duration| {
        let http = http.clone();
        let url = url.clone();
        let payload = payload.clone();
        async move {
            let deadline = Instant::now() + dur;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (http, url, payload) = (http.clone(), url.clone(), payload.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let r = http.post(&url).body(payload.clone()).send().await?;
                        let got = r.bytes().await?;
                        anyhow::ensure!(
                            got.len() == payload.len(),
                            "echo returned {} bytes",
                            got.len()
                        );
                        lat.push(t.elapsed().as_micros() as i64);
                    }
                    Ok::<_, anyhow::Error>(lat)
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            Ok::<_, anyhow::Error>(figures(all, start.elapsed()))
        }
    };
    run(Duration::from_secs_f64(0.5)).await?;
    let cpu = cpu_time();
    let mut f = run(Duration::from_secs_f64(secs)).await?;
    f.cpu_us = (cpu_time() - cpu).as_secs_f64() * 1e6 / f.n.max(1) as f64;
    Ok(f)
}

// === relay ===

/// `c` senders in area A each submit one message after another to their own
/// recipient in area B; a message's latency runs from the start of its
/// submission at A until it is `delivered` for its sender (on disk at B, and
/// A has B's answer). The throughput is B's: messages over the span of B's
/// commits.
async fn run_relay(
    fed: &Federation,
    c: usize,
    body: usize,
    secs: f64,
    accept_only: bool,
) -> anyhow::Result<Figures> {
    let (a, b) = (0, 1);
    let sent_before = federation_sent(fed, a);
    let cpu = cpu_time();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let api = fed.api(a, &format!("s{w}"))?;
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while Instant::now() < deadline {
                // Keys as the real client makes them (time-ordered).
                let key = client::fresh_idempotency_key().to_string();
                let m = message(&format!("user:r{w}@southvale"), &key, vec![b'r'; body])?;
                let t = now_us();
                api.submit(&m).await?;
                sent.push((key, t, now_us() - t));
            }
            Ok::<_, anyhow::Error>(sent)
        }));
    }
    let mut sent = std::collections::HashMap::new();
    let mut accept = Vec::new();
    for t in tasks {
        for (key, t0, rtt) in t.await?? {
            sent.insert(key, t0);
            accept.push(rtt);
        }
    }
    if accept_only {
        let cpu = cpu_time() - cpu;
        let mut f = figures(accept, start.elapsed());
        f.cpu_us = cpu.as_secs_f64() * 1e6 / f.n.max(1) as f64;
        return Ok(f);
    }
    let (items, batches) = federation_sent(fed, a);
    let (items, batches) = (items - sent_before.0, batches - sent_before.1);
    eprintln!(
        "    A sent {items} items in {batches} federation batches ({:.1} per batch)",
        items as f64 / batches.max(1) as f64
    );
    let acc = figures(accept, Duration::from_secs(1));
    eprintln!(
        "    accept at A: p50 {:.2} ms p99 {:.2} ms",
        acc.p50_ms, acc.p99_ms
    );
    let since = sent.values().copied().min().unwrap_or(0);
    // B's commit times give the relay's throughput (and, for reference, the
    // latency to B's row, written before B's fsync).
    let (stored, scan_b) = wait_for_times(
        &fed.db_path(b),
        "SELECT idem_key, stored_at_us FROM inbox WHERE stored_at_us >= ?1",
        since,
        &sent,
    )
    .await?;
    // The latency is to the sender's `delivered`: B has the message on disk
    // and A has its answer. A records that in whole milliseconds; the end of
    // that millisecond is taken, so the figure errs long.
    let (delivered, scan_a) = wait_for_times(
        &fed.db_path(a),
        "SELECT idem_key, (delivered_ms + 1) * 1000 FROM sent WHERE accepted_ms >= ?1 / 1000 - 1 AND delivered_ms IS NOT NULL",
        since,
        &sent,
    )
    .await?;
    // The bench's own reading of the results is not the relay's work.
    let cpu = (cpu_time() - cpu).saturating_sub(scan_a + scan_b);
    let last = stored.iter().map(|(_, at)| *at).max().unwrap_or(0);
    let elapsed = Duration::from_micros((last - since).max(1) as u64);
    let at_b = figures(stored.iter().map(|(t0, at)| at - t0).collect(), elapsed);
    eprintln!(
        "    stored at B (row written, before B's fsync): p50 {:.2} ms p99 {:.2} ms",
        at_b.p50_ms, at_b.p99_ms
    );
    let mut f = figures(delivered.iter().map(|(t0, at)| at - t0).collect(), elapsed);
    f.per_sec = at_b.per_sec;
    f.cpu_us = cpu.as_secs_f64() * 1e6 / f.n.max(1) as f64;
    eprintln!(
        "    the bench's reading of the results: {:.0} ms of CPU, not counted",
        (scan_a + scan_b).as_secs_f64() * 1e3
    );
    Ok(f)
}

/// Gateway `i`'s federation items and batches sent so far.
fn federation_sent(fed: &Federation, i: usize) -> (u64, u64) {
    fed.gateway(i).map_or((0, 0), |g| {
        let m = g.metrics();
        (
            m.federation_items_sent.get(),
            m.federation_batches_sent.get(),
        )
    })
}

/// Waits until `sql` (with `?1` = `since`, in µs) returns a time for every
/// key in `sent`, and returns (submission time, that time) per message, and
/// the CPU time its queries took (the bench's, not the relay's).
async fn wait_for_times(
    db: &std::path::Path,
    sql: &str,
    since: i64,
    sent: &std::collections::HashMap<String, i64>,
) -> anyhow::Result<(Vec<(i64, i64)>, Duration)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut spent = Duration::ZERO;
    loop {
        // No await from here to the check: one thread runs it all.
        let cpu = thread_cpu_time();
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map([since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut times = Vec::with_capacity(sent.len());
        for row in rows {
            let (key, at) = row?;
            if let Some(t0) = sent.get(&key) {
                times.push((*t0, at));
            }
        }
        spent += thread_cpu_time().saturating_sub(cpu);
        if times.len() >= sent.len() {
            return Ok((times, spent));
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "only {} of {} messages got that far",
            times.len(),
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Raw fsync cost on this disk, for context.
fn fsync_baseline(dir: &std::path::Path) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(dir.join("fsync.bin"))?;
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        f.write_all(&[0u8; 512])?;
        f.sync_data()?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    let senders: Vec<String> = (0..max_c).map(|i| format!("s{i}")).collect();
    let receivers: Vec<String> = (0..max_c)
        .map(|i| format!("r{i}"))
        .chain((0..args.waiting_polls).map(|i| format!("w{i}")))
        .collect();
    let areas: Vec<tests::AreaUsers<'_>> = vec![
        (
            "northshire",
            senders.iter().map(|s| (s.as_str(), &[][..])).collect(),
        ),
        (
            "southvale",
            receivers.iter().map(|s| (s.as_str(), &[][..])).collect(),
        ),
    ];
    let settings = Settings {
        toml: format!("[delivery]\nretry_initial = \"50ms\"\nretry_max = \"1s\"\nbatches_in_flight = {}\n\n[limits]\nuser_requests_per_second = 1000000\nuser_burst = 1000000\npeer_requests_per_second = 1000000\npeer_burst = 1000000\n", args.batches_in_flight),
        policies: false,
    };
    if args.store_only {
        for &c in &args.concurrency {
            let s = store::run(c, args.body, args.seconds).await?;
            println!(
                "storage alone, {c} in flight: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, cpu {:.0} µs per message",
                s.per_sec, s.p50_ms, s.p99_ms, s.cpu_us
            );
        }
        return Ok(());
    }
    let mut fed = Federation::create(&areas, &settings).context("creating the federation")?;
    if args.link_delay_ms > 0 {
        // A reaches B through the slow link: point A's peer URL at it.
        let b_port = fed.port(1)?;
        let via = link::start(b_port, Duration::from_millis(args.link_delay_ms)).await?;
        let path = &fed.areas[0].config_path;
        let config = std::fs::read_to_string(path)?;
        let direct = format!("https://127.0.0.1:{b_port}\"");
        anyhow::ensure!(
            config.contains(&direct),
            "A's configuration has no peer URL for B"
        );
        std::fs::write(
            path,
            config.replace(&direct, &format!("https://127.0.0.1:{via}\"")),
        )?;
    }
    fed.start(0).await?;
    if !args.accept_only {
        fed.start(1).await?;
    }
    let (echo_port, echo) = start_echo(&fed).await?;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "relay A→B vs plain rustls+hyper mTLS echo; {} B bodies; {:.1} s per point; {} ms each way between A and B; {} batches in flight; {cores} cores",
        args.body, args.seconds, args.link_delay_ms, args.batches_in_flight,
    );
    println!(
        "raw fdatasync loop: {:.0} syncs/s",
        fsync_baseline(fed.dir.path())?
    );
    println!(
        "{:>9} | {:>10} {:>8} {:>8} {:>7} | {:>10} {:>8} {:>8} {:>7} | {:>8}",
        "in flight",
        "echo/s",
        "p50 ms",
        "p99 ms",
        "cpu µs",
        "relay/s",
        "p50 ms",
        "p99 ms",
        "cpu µs",
        "ratio"
    );
    for &c in &args.concurrency {
        // Warm-up, then rounds of echo and relay in turn.
        run_relay(&fed, c, args.body, 0.5, args.accept_only).await?;
        let (mut echoes, mut relays) = (Vec::new(), Vec::new());
        for round in 1..=args.rounds.max(1) {
            let e = if args.relay_only {
                Figures::default()
            } else {
                run_echo(&fed, echo_port, c, args.body, args.seconds).await?
            };
            let r = run_relay(&fed, c, args.body, args.seconds, args.accept_only).await?;
            eprintln!(
                "    round {round}: echo {:.0}/s p99 {:.2} ms, relay {:.0}/s p50 {:.2} ms p99 {:.2} ms",
                e.per_sec, e.p99_ms, r.per_sec, r.p50_ms, r.p99_ms
            );
            echoes.push(e);
            relays.push(r);
        }
        let (e, r) = (median(&echoes), median(&relays));
        println!(
            "{:>9} | {:>10.0} {:>8.2} {:>8.2} {:>7.0} | {:>10.0} {:>8.2} {:>8.2} {:>7.0} | {:>7.1}%   (n echo {}, relay {})",
            c, e.per_sec, e.p50_ms, e.p99_ms, e.cpu_us, r.per_sec, r.p50_ms, r.p99_ms, r.cpu_us, 100.0 * r.per_sec / e.per_sec.max(1.0), e.n, r.n
        );
        if r.cpu_us > 0.0 {
            // What the relay would reach if its CPU per message stayed the
            // same and nothing but the CPUs held it back: tells a relay
            // waiting on the disk from one the CPUs limit.
            let ceiling = cores as f64 * 1e6 / r.cpu_us;
            println!(
                "{:>9}   CPUs busy: echo {:.0} %, relay {:.0} %; relay at all CPUs busy: {:.0}/s ({:.1} % of the echo)",
                "",
                busy(&e, cores),
                busy(&r, cores),
                ceiling,
                100.0 * ceiling / e.per_sec.max(1.0)
            );
        }
    }
    if args.waiting_polls > 0 && !args.accept_only {
        let waiters = &receivers[max_c..];
        let (alone, beside) =
            waiting::run(&fed, waiters, args.body, args.seconds, args.rounds).await?;
        println!(
            "relay at 1 in flight with {} other long-polls waiting at B: {:.0}/s, cpu {:.0} µs per message; with none: {:.0}/s, cpu {:.0} µs ({:.2}× the CPU)",
            waiters.len(),
            beside.per_sec,
            beside.cpu_us,
            alone.per_sec,
            alone.cpu_us,
            beside.cpu_us / alone.cpu_us.max(1.0)
        );
    }
    echo.abort();
    fed.stop(0).await;
    fed.stop(1).await;
    let c = args.concurrency.iter().copied().max().unwrap_or(1);
    let s = store::run(c, args.body, args.seconds).await?;
    println!(
        "storage alone (two SqliteStores, no TLS or HTTP), {c} in flight: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, cpu {:.0} µs per message",
        s.per_sec, s.p50_ms, s.p99_ms, s.cpu_us
    );
    if args.inbox_history > 0 {
        let waiting = 20;
        let (with, without) = store::listing(args.inbox_history, waiting).await?;
        println!(
            "inbox listing, {waiting} messages waiting: {with:.0} µs after {} acknowledged ones, {without:.0} µs with none before them ({:.2}×)",
            args.inbox_history,
            with / without.max(1.0)
        );
    }
    if args.mls {
        mls::run(args.mls_rounds, 5, 8192).await?;
    }
    Ok(())
}
