//! An area's referral gateway.
//!
//! The gateway accepts mutual-TLS connections from its own area's users and
//! from the gateways of configured peer areas, stores messages durably, and
//! forwards them to the recipient's area, exactly once and in order per peer.
//! Message bodies are opaque bytes to it.
//!
//! Promises:
//! * identity comes only from the verified client certificate (see `certs`);
//! * a message is committed to disk before the sender hears `accepted`, and
//!   a peer's batch before the peer hears `stored`;
//! * resubmissions and retries are deduplicated on the idempotency key and
//!   the message id;
//! * a message that cannot reach its peer within its validity goes back to
//!   its sender as `undeliverable`, with the reason;
//! * logs never contain message bodies.

mod api;
pub mod config;
mod connection;
pub mod dev;
mod disk;
mod expiry;
mod federation;
mod inbox_watch;
pub mod metrics;
mod peer_clients;
mod revocation;
mod sequencer;
pub mod sharing;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use certs::{Credentials, PeerTrust, ServerTrust, VerifiedPeer};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use proto::AreaId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;
use tracing::Instrument as _;

pub use config::{Config, ConfigError, Directory, PeerConfig};
use store::{SqliteStore, Store};

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate, key or CA file is unusable.
    #[error("TLS: {0}")]
    Certs(#[from] certs::CertError),
    /// The database could not be opened.
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The area's sharing policy could not be loaded or verified.
    #[error(transparent)]
    Policy(#[from] sharing::SharingError),
    /// An HTTP client for a peer could not be built.
    #[error("HTTP client for peer {peer}: {message}")]
    PeerClient {
        /// The peer.
        peer: AreaId,
        /// What failed.
        message: String,
    },
    /// A reloaded configuration cannot be taken up; nothing was changed.
    #[error("reload refused: {0}")]
    Reload(String),
}

/// What [`Gateway::reload`] put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reloaded {
    /// Users in the directory now.
    pub users: usize,
    /// The sharing policy's version now, if the area has one.
    pub policy_version: Option<u32>,
    /// Certificates the revocation lists revoke now.
    pub revoked: usize,
    /// Who joined and left teams (see [`store::Store::sync_teams`]).
    pub teams: store::TeamChanges,
    /// Peers taken in, taken out and moved to another address.
    pub peers: PeerChanges,
    /// Messages queued for the peers taken out, returned to their senders
    /// as undeliverable.
    pub given_back: usize,
    /// Settings that differ from those the gateway runs with and take
    /// effect only when it is restarted.
    pub needs_restart: Vec<&'static str>,
}

/// How a reload changed the federation peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerChanges {
    /// Areas that became peers: their workers started.
    pub added: Vec<AreaId>,
    /// Areas that are peers no longer: their workers stopped, messages
    /// queued for them went back to their senders.
    pub removed: Vec<AreaId>,
    /// Peers at a new address: their workers started again there.
    pub moved: Vec<AreaId>,
}

impl PeerChanges {
    /// From the peers in force to those of a new configuration.
    fn between(old: &[PeerConfig], new: &[PeerConfig]) -> PeerChanges {
        let find =
            |list: &[PeerConfig], area: &AreaId| list.iter().find(|p| &p.area == area).cloned();
        let mut changes = PeerChanges::default();
        for p in new {
            match find(old, &p.area) {
                None => changes.added.push(p.area.clone()),
                Some(was) if was.url != p.url => changes.moved.push(p.area.clone()),
                Some(_) => {}
            }
        }
        for p in old {
            if find(new, &p.area).is_none() {
                changes.removed.push(p.area.clone());
            }
        }
        changes
    }
}

/// The settings of `new` that differ from `old` and that a running gateway
/// does not take up (everything but the users, the sharing policy, the
/// peers, the certificates and the revocation lists).
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut differ = Vec::new();
    for (name, same) in [
        ("listen", old.listen == new.listen),
        ("data_dir", old.data_dir == new.data_dir),
        ("metrics_listen", old.metrics_listen == new.metrics_listen),
        (
            "tls.crl_check_every",
            old.tls.crl_check_every == new.tls.crl_check_every,
        ),
        ("delivery", old.delivery == new.delivery),
        ("limits", old.limits == new.limits),
        ("retention", old.retention == new.retention),
    ] {
        if !same {
            differ.push(name);
        }
    }
    differ
}

/// For `gateway check-config`: one line per certificate the gateway
/// depends on (its own, its area's CA, each peer's CA) saying when it
/// expires. Fails as [`Gateway::start`] would on an expired gateway
/// certificate.
pub fn certificate_report(config: &Config) -> Result<Vec<String>, GatewayError> {
    let all = expiry::load(config)?;
    Ok(expiry::report(&all, expiry::now_s()))
}

/// For `gateway check-config`: one line per revocation list (`tls.crls`,
/// `peers[].crls`): how many certificates it revokes and when its CA
/// promises the next. Fails as [`Gateway::start`] would on a list that
/// cannot be read or is not signed by its area's CA.
pub fn revocation_report(config: &Config) -> Result<Vec<String>, GatewayError> {
    let list = revocation::Sources::of(config).load()?;
    Ok(revocation::describe(&list, expiry::now_s()))
}

/// For `gateway check-config`: the data directory's free space against
/// `limits.min_free_disk_mib`.
pub fn data_dir_report(config: &Config) -> String {
    let dir = config.data_dir.display();
    let reserve = config.limits.min_free_disk_mib;
    match disk::free_bytes(&config.data_dir) {
        Ok(free) => {
            let free_mib = free / (1024 * 1024);
            let verdict = if free_mib < reserve {
                ": below it, new messages would be refused; make room"
            } else {
                ""
            };
            format!("data directory {dir}: {free_mib} MiB free (limits.min_free_disk_mib = {reserve}){verdict}")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("data directory {dir}: not there yet (made at the first start)")
        }
        Err(e) => format!("data directory {dir}: cannot read its free space: {e}"),
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// State shared by the accept loop, the handlers and the peer workers.
pub(crate) struct Shared {
    /// The configuration the gateway started with (see [`Live`] for what a
    /// reload changes).
    config: Config,
    /// What a reload may replace while the gateway runs.
    live: std::sync::RwLock<Arc<Live>>,
    store: SqliteStore,
    users_limiter: DefaultKeyedRateLimiter<String>,
    peers_limiter: DefaultKeyedRateLimiter<String>,
    /// Wakes a long-poll when a message for its mailbox is stored.
    inbox_watch: inbox_watch::InboxWatch,
    /// The long-polls waiting per user (a few at most).
    polls: inbox_watch::PollSlots,
    /// One reload at a time: the teams recorded in the store and the
    /// directory in force change together, and a sweep for former peers
    /// does not run while a reload takes one back in.
    reloading: tokio::sync::Mutex<()>,
    /// Each running peer worker's wake-up (peers come and go on reloads).
    wakers: std::sync::RwLock<HashMap<AreaId, Arc<federation::PeerWake>>>,
    /// HTTP client and base URL per peer.
    peer_clients: peer_clients::PeerClients,
    /// The revocation lists in force (handshakes and requests), and their files.
    crls: Arc<revocation::InForce>,
    /// Whether the last reload of the configuration file failed.
    reload_failed: std::sync::atomic::AtomicBool,
    /// Whether the directory's teams could not be recorded in the store at
    /// the last start or reload (see `record_teams`).
    teams_unrecorded: std::sync::atomic::AtomicBool,
    /// Peers' current policy versions.
    peer_policies: sharing::PeerPolicies,
    stop: watch::Sender<bool>,
    metrics: Arc<metrics::Metrics>,
    /// Puts peers' pipelined batches in their order before storing them.
    sequencer: sequencer::Sequencer,
    /// Free space on the data directory's disk: below the reserve, new
    /// messages are refused.
    disk: Arc<disk::DiskSpace>,
    /// When the certificates this gateway depends on expire.
    expiries: Arc<std::sync::RwLock<Vec<expiry::Expiry>>>,
    /// The TLS configuration new connections are accepted with.
    acceptor: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
}

/// The parts of the configuration a running gateway takes up again on a
/// reload ([`Gateway::reload`]): who is in the area, and its sharing policy.
/// A request works with one of these throughout.
pub(crate) struct Live {
    /// The area's directory of users.
    directory: Directory,
    /// This area's verified sharing policy, if configured.
    own_policy: Option<Arc<sharing::OwnPolicy>>,
    /// The federation peers.
    peers: Vec<PeerConfig>,
}

impl Live {
    /// The peer `area`, if it is one.
    fn peer(&self, area: &AreaId) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| &p.area == area)
    }
}

impl Shared {
    /// The TLS configuration to accept a new connection with.
    fn tls_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// When each certificate the gateway depends on expires, for the metrics.
    fn certificate_readings(&self) -> Vec<metrics::CertificateReading> {
        let all = self
            .expiries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter().map(expiry::Expiry::reading).collect()
    }

    /// The directory and policy in force.
    fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Since when, and why, the gateway of `area` has been failing to take
    /// what this one sends it (`None` for this area, or a peer that is fine).
    fn waiting_for(&self, area: &AreaId) -> Option<proto::Waiting> {
        self.wakers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(area)
            .and_then(|w| w.failing())
    }

    /// The data directory's disk as last read.
    fn disk_reading(&self) -> metrics::DiskReading {
        metrics::DiskReading {
            free_bytes: self.disk.free_bytes(),
            reserve_bytes: self.disk.reserve_bytes(),
            low: self.disk.is_low(),
        }
    }

    /// Records that messages for these recipients were stored, waking the
    /// long-polls of their mailboxes (and no others) to list again.
    fn inbox_changed<'a>(&self, targets: impl IntoIterator<Item = &'a proto::Target>) {
        self.inbox_watch.changed(targets);
    }

    /// Wakes a peer's worker to look at its queue.
    fn wake_peer(&self, area: &AreaId) {
        let wakers = self
            .wakers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = wakers.get(area) {
            n.wake();
        }
    }

    /// Wakes every peer's worker (news for an area not looked up).
    fn wake_all_peers(&self) {
        let wakers = self
            .wakers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for n in wakers.values() {
            n.wake();
        }
    }
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate))
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<JoinSet<()>>,
    /// The running peer workers (a reload starts and stops them).
    workers: tokio::sync::Mutex<HashMap<AreaId, Worker>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("area", &self.shared.config.area)
            .field("addr", &self.addr)
            .finish()
    }
}

/// The TLS material a gateway runs with, read from its files: built at
/// start, and again whole on a reload (a renewed certificate, a peer's CA
/// bundle with its next CA).
struct TlsMaterial {
    acceptor: tokio_rustls::TlsAcceptor,
    own: Credentials,
    peers: Vec<(PeerTrust, String)>,
    expiries: Vec<expiry::Expiry>,
}

impl TlsMaterial {
    /// Reads the certificate files `config` names; refuses an expired
    /// gateway certificate.
    fn read(
        config: &Config,
        revocations: &certs::Revocations,
    ) -> Result<TlsMaterial, GatewayError> {
        // Each file is read once; the expiries come from what was read.
        let own = Credentials::load(&config.tls.cert, &config.tls.key)?;
        let own_cas = certs::load_certs(&config.tls.ca)?;
        let mut expiries = vec![
            expiry::of(expiry::Role::Gateway, &config.tls.cert, &own.chain)?,
            expiry::of(expiry::Role::AreaCa, &config.tls.ca, &own_cas)?,
        ];
        let mut peers = Vec::new();
        for p in &config.peers {
            let cas = certs::load_certs(&p.ca)?;
            expiries.push(expiry::of(
                expiry::Role::PeerCa(p.area.clone()),
                &p.ca,
                &cas,
            )?);
            peers.push(PeerTrust {
                area: p.area.clone(),
                cas,
            });
        }
        let expiries = expiry::refuse_expired_own(expiries)?;
        let trust = ServerTrust {
            own_area: config.area.clone(),
            own_cas,
            peers: peers.clone(),
            revocations: revocations.clone(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(certs::server_config(&own, &trust)?);
        let peers = peers
            .into_iter()
            .zip(&config.peers)
            .map(|(trust, p)| (trust, p.url.trim_end_matches('/').to_owned()))
            .collect();
        Ok(TlsMaterial {
            acceptor,
            own,
            peers,
            expiries,
        })
    }
}

impl Gateway {
    /// Loads certificates, opens the store, binds the listener and starts
    /// serving and forwarding.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let crl_sources = revocation::Sources::of(&config);
        let crl_list = crl_sources.read()?;
        revocation::report(crl_list.list(), expiry::now_s());
        let crls = Arc::new(revocation::InForce::new(crl_sources, crl_list));
        let revocations = crls.revocations().clone();
        let tls = TlsMaterial::read(&config, &revocations)?;
        let own_policy = match &config.policy {
            Some(p) => Some(Arc::new(sharing::OwnPolicy::load(p, &config.area)?)),
            None => None,
        };
        // Opening may wait for the data directory's lock (a previous
        // instance's threads finishing): off the runtime's threads, so the
        // tasks that end that instance can run meanwhile.
        let (dir, area) = (config.data_dir.clone(), config.area.clone());
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir, area))
            .await
            .map_err(|e| store::StoreError::Db(format!("opening the store: {e}")))??;
        // Who is in which team: whom the teams' MLS messages are for.
        let directory = Directory::new(&config.users);
        let (_, teams_unrecorded) = record_teams(&store, &directory).await;
        // Peers' pipelined sessions go on where the store left them.
        let sequencer = sequencer::Sequencer::default();
        for (peer, at) in store.peer_sessions().await? {
            sequencer.resume(&peer, at.session, at.batch);
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;

        let peer_clients = peer_clients::PeerClients::new(
            tls.own,
            tls.peers,
            revocations.clone(),
            config.delivery.peer_timeout,
        )?;
        let limits = &config.limits;
        let disk = Arc::new(disk::DiskSpace::new(
            &config.data_dir,
            limits.min_free_disk_mib,
        ));
        // Read before anyone is served, so a gateway started on a full disk
        // refuses new messages from the first request.
        disk::check_and_log(&disk, &mut false);
        let shared = Arc::new(Shared {
            live: std::sync::RwLock::new(Arc::new(Live {
                directory,
                own_policy,
                peers: config.peers.clone(),
            })),
            users_limiter: RateLimiter::keyed(quota(
                limits.user_requests_per_second,
                limits.user_burst,
            )),
            peers_limiter: RateLimiter::keyed(quota(
                limits.peer_requests_per_second,
                limits.peer_burst,
            )),
            store,
            inbox_watch: inbox_watch::InboxWatch::default(),
            polls: Default::default(),
            reloading: tokio::sync::Mutex::new(()),
            wakers: Default::default(),
            peer_clients,
            crls,
            reload_failed: Default::default(),
            teams_unrecorded: std::sync::atomic::AtomicBool::new(teams_unrecorded),
            peer_policies: sharing::PeerPolicies::default(),
            stop: watch::channel(false).0,
            metrics: Arc::new(metrics::Metrics::default()),
            sequencer,
            disk,
            expiries: Arc::new(std::sync::RwLock::new(tls.expiries)),
            acceptor: std::sync::RwLock::new(tls.acceptor),
            config,
        });

        give_back_to_former_peers(&shared).await;
        let mut tasks = JoinSet::new();
        let mut workers = HashMap::new();
        for peer in shared.config.peers.clone() {
            let area = peer.area.clone();
            workers.insert(area, start_worker(&shared, &mut tasks, peer));
        }
        let metrics_addr = match shared.config.metrics_listen {
            Some(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|source| GatewayError::Bind { addr: a, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| GatewayError::Bind { addr: a, source })?;
                tasks.spawn(serve_metrics(shared.clone(), l));
                Some(bound)
            }
            None => None,
        };
        tasks.spawn(erase_loop(shared.clone()));
        tasks.spawn(disk::watch(shared.disk.clone(), shared.stop.subscribe()));
        tasks.spawn(expiry::watch(
            shared.expiries.clone(),
            shared.stop.subscribe(),
        ));
        tasks.spawn(revocation::watch(
            shared.crls.clone(),
            shared.config.tls.crl_check_every,
            shared.stop.subscribe(),
        ));
        tasks.spawn(accept_loop(shared.clone(), listener));
        tracing::info!(area = %shared.config.area, %addr, peers = shared.config.peers.len(), users = shared.config.users.len(), "gateway started");
        Ok(Gateway {
            addr,
            metrics_addr,
            shared,
            tasks: std::sync::Mutex::new(tasks),
            workers: tokio::sync::Mutex::new(workers),
        })
    }

    /// The address the gateway listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the metrics endpoint, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The gateway's counters (what `/metrics` shows).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.shared.metrics
    }

    /// This gateway's area.
    pub fn area(&self) -> &AreaId {
        &self.shared.config.area
    }

    /// [`Gateway::reload`] from the configuration file at `path`, read
    /// again. Whether it failed (the file or what it names could not be
    /// used) shows in the metric `gateway_config_reload_failed` until the
    /// next reload.
    pub async fn reload_file(&self, path: &std::path::Path) -> Result<Reloaded, GatewayError> {
        let result = match Config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => Err(e.into()),
        };
        self.shared
            .reload_failed
            .store(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        result
    }

    /// Takes up what can change while the gateway runs from `new` (the
    /// configuration file read again, e.g. on SIGHUP): the directory of
    /// users, the sharing policy, the revocation lists (their files too),
    /// and the certificates: the gateway's own (renewed, or its key
    /// rotated), its area's CA and peers' CAs, for new connections (open
    /// ones go on). Everything is read and checked first; if any of it
    /// cannot be used (an expired certificate included), nothing changes
    /// and the error says why. Other settings that differ are listed in
    /// [`Reloaded::needs_restart`] and left as they run.
    pub async fn reload(&self, new: Config) -> Result<Reloaded, GatewayError> {
        let _one_at_a_time = self.shared.reloading.lock().await;
        let shared = &self.shared;
        if new.area != shared.config.area {
            return Err(GatewayError::Reload(format!(
                "the area changed from {} to {}: that is another gateway",
                shared.config.area, new.area
            )));
        }
        let new = Arc::new(new);
        let (read, with) = (new.clone(), shared.clone());
        let (policy, crls, tls, clients) = tokio::task::spawn_blocking(move || {
            let policy = match &read.policy {
                Some(p) => Some(Arc::new(sharing::OwnPolicy::load(p, &read.area)?)),
                None => None,
            };
            let sources = revocation::Sources::of(&read);
            let crls = sources.read()?;
            // Certificates as they are in the files now (renewed ones
            // included), checked by building what uses them.
            let tls = TlsMaterial::read(&read, with.crls.revocations())?;
            let clients = with
                .peer_clients
                .prepare(tls.own.clone(), tls.peers.clone())?;
            Ok::<_, GatewayError>((policy, (sources, crls), tls, clients))
        })
        .await
        .map_err(|e| GatewayError::Reload(format!("reading the files: {e}")))??;
        let old = shared.live();
        if let (Some(was), Some(now)) = (&old.own_policy, &policy) {
            let (was, now) = (&was.policy, &now.policy);
            if was.id() == now.id() && now.version() < was.version() {
                return Err(GatewayError::Reload(format!(
                    "the sharing policy {} would go back from version {} to {}: peers and clients already hold the newer one",
                    now.id(),
                    was.version(),
                    now.version()
                )));
            }
        }
        let (sources, crls) = crls;
        // Everything is checked: the store records the teams' members, then
        // the directory is put in force. A newcomer is shown the team's MLS
        // messages stored from here on; one stored before the new directory
        // is in force was not encrypted for her (its sender's claim saw the
        // old directory), and her client acknowledges it as not hers.
        let directory = Directory::new(&new.users);
        let (teams, unrecorded) = record_teams(&shared.store, &directory).await;
        shared
            .teams_unrecorded
            .store(unrecorded, std::sync::atomic::Ordering::Relaxed);
        let peers = PeerChanges::between(&old.peers, &new.peers);
        let mut reloaded = Reloaded {
            users: new.users.len(),
            policy_version: policy.as_ref().map(|p| p.policy.version()),
            revoked: crls.list().revoked(),
            teams,
            peers,
            given_back: 0,
            needs_restart: needs_restart(&shared.config, &new),
        };
        revocation::report(crls.list(), expiry::now_s());
        let live = Arc::new(Live {
            directory,
            own_policy: policy,
            peers: new.peers.clone(),
        });
        *shared
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = live;
        shared.crls.put(sources, crls);
        *shared
            .acceptor
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tls.acceptor;
        *shared
            .expiries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tls.expiries;
        shared.peer_clients.put(clients);
        reloaded.given_back = self.change_workers(&new.peers, &reloaded.peers).await;
        tracing::info!(
            users = reloaded.users,
            policy_version = reloaded.policy_version,
            revoked = reloaded.revoked,
            joined_teams = teams.joined,
            returned_to_teams = teams.returned,
            left_teams = teams.left,
            peers_added = ?reloaded.peers.added,
            peers_removed = ?reloaded.peers.removed,
            peers_moved = ?reloaded.peers.moved,
            given_back = reloaded.given_back,
            needs_restart = ?reloaded.needs_restart,
            "configuration reloaded: directory, sharing policy, peers, certificates and revocation lists in force"
        );
        Ok(reloaded)
    }

    /// Stops the workers of peers taken out or moved, returns what was
    /// queued for those taken out to its senders (how many messages), and
    /// starts workers for peers taken in or moved.
    async fn change_workers(&self, peers: &[PeerConfig], changes: &PeerChanges) -> usize {
        let shared = &self.shared;
        let mut workers = self.workers.lock().await;
        for area in changes.removed.iter().chain(&changes.moved) {
            if let Some(w) = workers.remove(area) {
                stop_worker(shared, w).await;
            }
        }
        let mut given_back = 0;
        if !changes.removed.is_empty() {
            given_back = give_back_to_former_peers(shared).await;
            // A request that found the peer in force just before the
            // reload may queue for it just after: look again shortly.
            let later = shared.clone();
            self.tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .spawn(async move {
                    let mut stop = later.stop.subscribe();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {
                            let _no_reload = later.reloading.lock().await;
                            give_back_to_former_peers(&later).await;
                        }
                        _ = stopped(&mut stop) => {}
                    }
                });
        }
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in peers {
            if changes.added.contains(&p.area) || changes.moved.contains(&p.area) {
                workers.insert(p.area.clone(), start_worker(shared, &mut tasks, p.clone()));
            }
        }
        given_back
    }

    /// Stops accepting, lets open requests finish (up to 10 s), stops the
    /// peer workers and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.shared.stop.send(true);
        for w in self.workers.get_mut().values() {
            let _ = w.leave.send(true);
        }
        let tasks = self
            .tasks
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), drain)
            .await
            .is_err()
        {
            tracing::warn!("shutdown: tasks did not finish in time; aborting them");
            tasks.abort_all();
        }
        tracing::info!(area = %self.shared.config.area, "gateway stopped");
    }
}

/// A running peer worker.
struct Worker {
    /// The peer as the worker was started with.
    peer: PeerConfig,
    /// Tells the worker to stop.
    leave: watch::Sender<bool>,
    /// Ends when the worker has stopped.
    done: tokio::sync::oneshot::Receiver<()>,
}

/// Starts the federation worker of `peer`.
fn start_worker(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, peer: PeerConfig) -> Worker {
    let wake = Arc::new(federation::PeerWake::default());
    shared
        .wakers
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(peer.area.clone(), wake.clone());
    let (leave, stop) = watch::channel(false);
    let (finished, done) = tokio::sync::oneshot::channel();
    let span = tracing::info_span!("peer", peer = %peer.area);
    let work = federation::peer_worker(shared.clone(), peer.clone(), wake, stop).instrument(span);
    tasks.spawn(async move {
        work.await;
        drop(finished);
    });
    Worker { peer, leave, done }
}

/// Stops a peer's worker and waits until it has (its batches on the wire
/// are dropped; the peer deduplicates them if they come again).
async fn stop_worker(shared: &Shared, worker: Worker) {
    let _ = worker.leave.send(true);
    let _ = worker.done.await;
    shared
        .wakers
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&worker.peer.area);
}

/// Returns to their senders, as undeliverable, the messages queued for
/// areas that are no longer peers (taken out of the configuration since
/// they were queued): no worker would ever send them, and their senders
/// would otherwise see them waiting for good. Status updates queued for
/// such an area are dropped.
async fn give_back_to_former_peers(shared: &Shared) -> usize {
    let queued = match shared.store.queued_peers().await {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "could not look for messages queued for former peers; the next start or reload looks again");
            return 0;
        }
    };
    let mut given_back = 0;
    for area in queued {
        if shared.live().peer(&area).is_some() {
            continue;
        }
        let reason = format!(
            "{area} is no longer a federation peer of this gateway (it was taken out of the gateway's configuration) and had not confirmed having the message (if it was on its way then, {area} may have it); ask your gateway's operator, or share it with {area} another way"
        );
        let (messages, updates) = match shared
            .store
            .give_back_queue(area.clone(), now_ms(), reason)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(former_peer = %area, error = %e, "could not return the messages queued for a former peer; the next start or reload tries again");
                continue;
            }
        };
        given_back += messages;
        shared.metrics.undeliverable.add(messages as u64);
        tracing::warn!(
            former_peer = %area,
            messages,
            status_updates = updates,
            "queued for an area that is no longer a peer: messages returned to their senders as undeliverable, status updates dropped"
        );
    }
    given_back
}

/// Runs a gateway until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let gw = Gateway::start(config).await?;
    shutdown.await;
    gw.shutdown().await;
    Ok(())
}

/// How much of what a client sends is read while a refused handshake's
/// connection is drained (for at most [`connection::LINGER`]) before it is
/// dropped, so that the client reads the alert saying why
/// (`certificate_revoked`, `bad_certificate`, ...).
///
/// In TLS 1.3 a client sends its first request right after its own
/// `Finished`, before the server has judged its certificate. Dropping the
/// socket with that request unread makes the kernel answer with a reset,
/// and a client whose request is written after the reset arrives gets
/// "connection reset" instead of the alert: a revoked laptop would be told
/// its network failed. So the write side is shut and what the client sends
/// is read and discarded until it closes,
/// for at most [`connection::LINGER`] and this many bytes
/// ([`connection::drain`]). (The TLS layer has made its last attempt to
/// write the alert; a client that never reads it loses nothing by this.)
const HANDSHAKE_LINGER_BYTES: usize = 64 * 1024;

/// Files the gateway keeps open beside its connections: the store's
/// database, WAL and body segments, its connections to peers, the metrics
/// listener, and the configuration and revocation files it reads.
const RESERVED_FILES: u64 = 256;

/// How many connections may be open at once: `limits.max_connections`,
/// kept below the open-files limit less [`RESERVED_FILES`], after raising
/// that limit (which a process may do itself, up to its hard limit; with
/// no hard limit, to what it needs). Without it, connections could take
/// every file, and the store could no longer open a new body segment.
fn connection_slots(configured: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = u64::try_from(configured)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED_FILES);
    let limit = getrlimit(Resource::Nofile);
    let mut files = limit.current.unwrap_or(u64::MAX);
    if files < needed {
        let to = limit.maximum.unwrap_or(needed).max(files);
        let raised = Rlimit {
            current: Some(to),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => files = to,
            Err(e) => {
                tracing::warn!(error = %e, open_files_limit = files, "could not raise the open-files limit")
            }
        }
    }
    let room = usize::try_from(files.saturating_sub(RESERVED_FILES))
        .unwrap_or(usize::MAX)
        .max(1);
    if room < configured {
        tracing::warn!(
            max_connections = configured,
            open_files_limit = files,
            using = room,
            "limits.max_connections is more than the open-files limit allows; raise that limit (systemd: LimitNOFILE=)"
        );
    }
    configured.min(room)
}

/// Most connections from one address still in their TLS handshake (each
/// may take up to 10 s): one source cannot hold every connection slot with
/// handshakes it never finishes. Past it, a new connection from that
/// address is closed at once.
const HANDSHAKES_PER_ADDRESS: usize = 32;

/// Connections in their TLS handshake, by remote address.
#[derive(Debug, Default)]
struct Handshaking(std::sync::Mutex<HashMap<std::net::IpAddr, usize>>);

/// One connection's place in [`Handshaking`], given back when dropped.
#[derive(Debug)]
struct InHandshake {
    all: Arc<Handshaking>,
    from: std::net::IpAddr,
}

impl Handshaking {
    /// A place for a handshake from `from`, if it has fewer than
    /// [`HANDSHAKES_PER_ADDRESS`] under way.
    fn enter(self: &Arc<Self>, from: std::net::IpAddr) -> Option<InHandshake> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(from).or_default();
        if *n >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(InHandshake {
            all: self.clone(),
            from,
        })
    }
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        let mut map = self.all.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.from);
            }
        }
    }
}

/// Waits for a free connection slot, saying so (at most once a minute)
/// when every one of the `cap` is taken; `None` when the gateway stops
/// first.
async fn connection_slot(
    shared: &Shared,
    cap: usize,
    slots: &Arc<tokio::sync::Semaphore>,
    warned: &mut Option<std::time::Instant>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    shared.metrics.connections_full.inc();
    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
        *warned = Some(std::time::Instant::now());
        tracing::warn!(
            connections = cap,
            "every connection slot is taken: new connections wait until one closes (limits.max_connections)"
        );
    }
    tokio::select! {
        slot = slots.clone().acquire_owned() => slot.ok(),
        _ = crate::stopped(stop) => None,
    }
}

/// How long this project's clients and peers keep an idle pooled
/// connection (see `client::Api` and `peer_clients`).
pub(crate) const CLIENT_POOL_IDLE: Duration = Duration::from_secs(30);

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let router = api::router(shared.clone());
    let mut stop = shared.stop.subscribe();
    let cap = connection_slots(shared.config.limits.max_connections);
    if shared.config.limits.idle_timeout <= CLIENT_POOL_IDLE {
        tracing::warn!(
            idle_timeout = ?shared.config.limits.idle_timeout,
            "limits.idle_timeout is not above the {} s clients and peers keep an idle connection: a request on one the gateway is closing fails, and only some are retried",
            CLIENT_POOL_IDLE.as_secs()
        );
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let handshaking = Arc::new(Handshaking::default());
    let mut warned = None;
    loop {
        let Some(slot) = connection_slot(&shared, cap, &slots, &mut warned, &mut stop).await else {
            break;
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut stop) => break,
        };
        let Some(in_handshake) = handshaking.enter(remote.ip()) else {
            shared.metrics.handshakes_refused.inc();
            tracing::debug!(%remote, "connection closed: its address has too many handshakes under way");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // The configuration in force now (a reload may have renewed it).
        let acceptor = shared.tls_acceptor();
        let router = router.clone();
        let shared = shared.clone();
        let mut stop = shared.stop.subscribe();
        tokio::spawn(async move {
            // Held until the connection ends, however it ends.
            let _slot = slot;
            let counted = shared.clone();
            let _open = counted.metrics.connections_open.hold();
            let handshake = acceptor.accept(tcp).into_fallible();
            // A handshake under way when the gateway stops is dropped.
            let done = tokio::select! {
                done = tokio::time::timeout(Duration::from_secs(10), handshake) => done,
                () = crate::stopped(&mut stop) => return,
            };
            drop(in_handshake);
            let tls = match done {
                Ok(Ok(tls)) => tls,
                Ok(Err((e, tcp))) => {
                    shared.metrics.tls_failures.inc();
                    tracing::info!(%remote, error = %e, "TLS handshake failed");
                    connection::drain(tcp, HANDSHAKE_LINGER_BYTES).await;
                    return;
                }
                Err(_) => {
                    shared.metrics.tls_failures.inc();
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let conn = tls.get_ref().1;
            let identified = VerifiedPeer::from_server_connection(conn).and_then(|peer| {
                let cert = certs::ConnectionCertificate::after_handshake(conn)?;
                Ok((peer, Arc::new(cert)))
            });
            let (peer, cert) = match identified {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "no usable identity after handshake");
                    connection::drain(tls, HANDSHAKE_LINGER_BYTES).await;
                    return;
                }
            };
            tracing::debug!(%remote, %peer, "connection");
            let limits = &shared.config.limits;
            let (idle, body_timeout) = (limits.idle_timeout, limits.body_timeout);
            let activity = connection::Activity::new();
            let svc = tower::service_fn({
                let (shared, activity) = (shared.clone(), activity.clone());
                move |req: axum::http::Request<hyper::body::Incoming>| {
                    let in_progress = activity.begin();
                    // A connection outlives a revocation made while it is
                    // open, and its certificate's `notAfter`: each request
                    // checks both.
                    let revoked = cert.check(shared.crls.revocations()).err();
                    if let Some(e) = &revoked {
                        api::count_refusal(&shared, &peer, e);
                        activity.end();
                    }
                    let mut req = req.map(|b| connection::Deadline::new(b, body_timeout));
                    req.extensions_mut().insert(peer.clone());
                    // For a long-poll, which outlasts its start.
                    req.extensions_mut().insert(cert.clone());
                    // For a long-poll refused when it wakes: it ends the
                    // connection, as a refusal here does.
                    req.extensions_mut().insert(activity.clone());
                    let (router, shared) = (router.clone(), shared.clone());
                    async move {
                        let resp = match revoked {
                            Some(e) => api::revoked(&e),
                            None => router.oneshot(req).await?,
                        };
                        if resp.status() == axum::http::StatusCode::REQUEST_TIMEOUT {
                            shared.metrics.bodies_timed_out.inc();
                        }
                        let small = hyper::body::Body::size_hint(resp.body())
                            .exact()
                            .is_some_and(|n| n <= connection::SMALL_RESPONSE);
                        Ok::<_, std::convert::Infallible>(if small {
                            resp
                        } else {
                            resp.map(|b| {
                                axum::body::Body::new(connection::Guarded::new(
                                    b,
                                    in_progress.activity(),
                                ))
                            })
                        })
                    }
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let (tls, back) = connection::Lingering::new(tls);
            let conn = builder
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc))
                .into_owned();
            let served = connection::serve(conn, &activity, idle, &mut stop).await;
            if served.ended == connection::Ended::Idle {
                shared.metrics.connections_idle_closed.inc();
                tracing::debug!(%remote, "connection closed: idle for limits.idle_timeout");
            }
            if let Some(e) = &served.error {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            // Drained before it is closed, so that an answer sent before a
            // request's body was read reaches the client (its slot is held
            // meanwhile).
            connection::linger(back, &served).await;
        });
    }
    drop(listener);
    // Every connection gives its slot back when it ends; each has
    // `connection::GRACE` to finish once told to stop, then at most
    // `connection::LINGER` to be drained.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    let wait = connection::GRACE + connection::LINGER + Duration::from_secs(1);
    if tokio::time::timeout(wait, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown: some connections were still open after {} s",
            wait.as_secs()
        );
    }
}

async fn serve_metrics(shared: Arc<Shared>, listener: TcpListener) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get({
            let shared = shared.clone();
            move || {
                let shared = shared.clone();
                async move {
                    let depths = shared.store.queue_depths().await.unwrap_or_default();
                    let mut text = shared.metrics.render(
                        &depths,
                        shared.store.fault().is_none(),
                        shared.disk_reading(),
                        &shared.certificate_readings(),
                    );
                    text.push_str(&metrics::revocation_text(
                        shared.crls.revocations().current().lists(),
                        shared.crls.failed(),
                    ));
                    text.push_str(&metrics::reload_text(
                        shared
                            .reload_failed
                            .load(std::sync::atomic::Ordering::Relaxed),
                        shared
                            .teams_unrecorded
                            .load(std::sync::atomic::Ordering::Relaxed),
                    ));
                    text
                }
            }
        }),
    );
    let mut stop = shared.stop.subscribe();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::stopped(&mut stop).await;
        })
        .await;
}

/// Records the directory's teams in the store (see
/// [`store::Store::sync_teams`]) and says what changed, and whether it
/// failed. A failure (a full disk, say) is logged, shown by the metric
/// `gateway_teams_unrecorded`, and changes nothing else: a directory put in
/// force without it errs on the safe side (a newcomer is shown none of the
/// team's MLS messages, and a leaver is still waited for) until the next
/// reload or start records it.
async fn record_teams(store: &SqliteStore, directory: &Directory) -> (store::TeamChanges, bool) {
    match store.sync_teams(directory.memberships(), now_ms()).await {
        Ok(teams) => {
            if teams != store::TeamChanges::default() {
                tracing::info!(
                    joined = teams.joined,
                    returned = teams.returned,
                    left = teams.left,
                    settled = teams.settled,
                    "team members recorded"
                );
            }
            (teams, false)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record the teams' members; newcomers see none of their teams' encrypted messages until a reload or restart records them");
            (store::TeamChanges::default(), true)
        }
    }
}

/// Erases, every `retention.erase_every`, the ciphertext of inbox messages
/// acknowledged longer than `retention.keep_acknowledged` ago: inline
/// bodies are zeroed in the database's pages, bodies in the body log are
/// overwritten with zeros, body segments no message refers to any more are
/// removed, and the WAL is truncated. First, team messages that waited only
/// for members gone longer than `store::WAIT_FOR_LEAVERS` are settled.
async fn erase_loop(shared: Arc<Shared>) {
    /// Messages erased per store call, so other writes interleave.
    const BATCH: usize = 1000;
    let retention = shared.config.retention.clone();
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(retention.erase_every) => {}
            _ = crate::stopped(&mut stop) => break,
        }
        // Status updates for a former peer queued since it was taken out
        // (its messages read here), and a message a request queued for it
        // just after: no worker sends them.
        {
            let _no_reload = shared.reloading.lock().await;
            give_back_to_former_peers(&shared).await;
        }
        let now = now_ms();
        match shared.store.settle_after_leavers(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                messages = n,
                "settled team messages that waited only for members who left; those no one acknowledged went back to their senders as undeliverable"
            ),
            Err(e) => tracing::warn!(error = %e, "could not settle messages waiting for leavers"),
        }
        let keep = u64::try_from(retention.keep_acknowledged.as_millis()).unwrap_or(u64::MAX);
        let by = now.saturating_sub(keep);
        let (erased, failed) =
            in_batches(BATCH, || shared.store.erase_settled(by, now, BATCH)).await;
        shared.metrics.messages_erased.add(erased as u64);
        if erased > 0 {
            tracing::info!(
                messages = erased,
                "erased the ciphertext of acknowledged messages"
            );
        }
        if let Err(e) = failed {
            tracing::warn!(error = %e, "could not erase acknowledged messages");
        }
        // Also after a restart: bodies erased before it and not yet zeroed.
        if let (_, Err(e)) = in_batches(BATCH, || shared.store.zero_erased(BATCH)).await {
            // Their segments stay until they are zeroed: unlinked first,
            // their bytes could no longer be zeroed, and would stay on the
            // disk until overwritten.
            tracing::warn!(error = %e, "could not zero erased bodies; their segments stay until the next pass");
            continue;
        }
        match shared.store.remove_erased_bodies().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(segments = n, "removed erased body segments"),
            Err(e) => tracing::warn!(error = %e, "could not remove erased body segments"),
        }
    }
}

/// Runs `step` (which handles up to `batch` items and says how many) until
/// a step handles fewer or fails; returns how many were handled, and the
/// failure if one ended it.
async fn in_batches<F, Fut>(batch: usize, mut step: F) -> (usize, Result<(), store::StoreError>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, store::StoreError>>,
{
    let mut total = 0;
    loop {
        match step().await {
            Ok(n) if n < batch => return (total + n, Ok(())),
            Ok(n) => total += n,
            Err(e) => return (total, Err(e)),
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
