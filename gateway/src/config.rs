//! The gateway's TOML configuration.
//!
//! Relative paths are resolved against the directory of the configuration
//! file. Unknown keys are errors, named with their line.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{AreaId, TeamId, UserId};
use serde::{Deserialize, Deserializer};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or a key is unknown or has a bad value.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with the line and the key.
        message: String,
    },
    /// The values parse but do not fit together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{e}: expected a duration such as \"250ms\", \"30s\" or \"5d\""
        ))
    })
}

/// The whole configuration of one gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's area.
    pub area: AreaId,
    /// Address to listen on for users and peers (mTLS), e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Where the database lives.
    pub data_dir: PathBuf,
    /// Optional plain-HTTP address for Prometheus `/metrics` (keep it on loopback).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// This gateway's certificate, key and own CA.
    pub tls: TlsConfig,
    /// Delivery timing.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Size and rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How long acknowledged messages' ciphertext is kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// This area's signed sharing policy.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Federation peers.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// The area's directory of users.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

/// The area's sharing policy: a signed policy document and the key that must
/// have signed it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The signed policy document (`policy` crate text form).
    pub file: PathBuf,
    /// The area's policy verification key, `ed25519:<base64>`.
    pub key: String,
}

/// Certificate files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain presented by this gateway (`spiffe://<area>/gateway`).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s) of this area: users' certificates chain to it.
    pub ca: PathBuf,
    /// Certificate revocation lists (PEM or DER) published by this area's
    /// CA: a user certificate on one is refused, even on a connection
    /// opened before. Re-read when a file changes.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// How often the CRL files (this area's and the peers') are looked at
    /// for changes.
    #[serde(default = "crl_check_every", deserialize_with = "duration")]
    pub crl_check_every: Duration,
}

fn crl_check_every() -> Duration {
    Duration::from_secs(10)
}

/// Delivery timing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How long a message may wait for its recipient's gateway before it is
    /// returned to its sender as undeliverable.
    #[serde(deserialize_with = "duration")]
    pub message_validity: Duration,
    /// First retry delay after a peer failure.
    #[serde(deserialize_with = "duration")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// Most items in one federation batch.
    pub batch_max_items: usize,
    /// Most batches on the wire to one peer at once. More than one is used
    /// only with a peer that confirms it stores them in order.
    pub batches_in_flight: usize,
    /// Timeout of one federation request.
    #[serde(deserialize_with = "duration")]
    pub peer_timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            message_validity: Duration::from_secs(5 * 86_400),
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(60),
            batch_max_items: 256,
            batches_in_flight: 4,
            peer_timeout: Duration::from_secs(30),
        }
    }
}

/// How long the ciphertext of acknowledged messages is kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How long an inbox message's ciphertext is kept once everyone who had
    /// to has acknowledged it (a message to a user: that user; an opaque
    /// message to a team: one member; an MLS message to a team: every
    /// member). Then it is erased; its envelope and status stay, and a
    /// fetch answers `410 Gone`. A message not yet acknowledged is kept.
    #[serde(deserialize_with = "duration")]
    pub keep_acknowledged: Duration,
    /// How often to look for ciphertext to erase.
    #[serde(deserialize_with = "duration")]
    pub erase_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_acknowledged: Duration::from_secs(30 * 86_400),
            erase_every: Duration::from_secs(600),
        }
    }
}

/// Size and rate limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message body a user may submit, in bytes (before base64).
    pub max_body_bytes: usize,
    /// Sustained requests per second per user.
    pub user_requests_per_second: u32,
    /// Burst of requests per user.
    pub user_burst: u32,
    /// Sustained federation requests per second per peer.
    pub peer_requests_per_second: u32,
    /// Burst of federation requests per peer.
    pub peer_burst: u32,
    /// Longest inbox long-poll a client may ask for.
    #[serde(deserialize_with = "duration")]
    pub max_inbox_wait: Duration,
    /// Free space, in MiB, to keep on the data directory's file system.
    /// Below it the gateway takes no new messages (users and peers are
    /// answered 507 and retry later; peers keep them queued), while
    /// fetching, acknowledging and status updates go on in the room left.
    /// 0 turns the check off.
    pub min_free_disk_mib: u64,
    /// Most connections (users' and peers') open at once. While that many
    /// are open, new ones wait in the listen queue until one closes. The
    /// gateway also keeps this below its open-files limit (which it raises
    /// as far as needed, up to the hard limit), so that its store can open its
    /// files.
    pub max_connections: usize,
    /// How long a connection may be open with no request in progress
    /// (between requests, or before its first request's headers are in)
    /// before the gateway closes it. Long-polls are requests in progress.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How long a request's body may take to arrive, from the first moment
    /// the gateway waits for it; past it the answer is `408
    /// request_timeout` and the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 1024 * 1024,
            user_requests_per_second: 50,
            user_burst: 200,
            peer_requests_per_second: 200,
            peer_burst: 400,
            max_inbox_wait: Duration::from_secs(60),
            min_free_disk_mib: 512,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// The most `limits.max_connections` may be.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// The most items a gateway takes in one federation batch (and so the most
/// `delivery.batch_max_items` may be).
pub const MAX_BATCH_ITEMS: usize = 4096;

/// One federation peer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's area.
    pub area: AreaId,
    /// Its base URL, e.g. `https://gateway.northshire.example:7443`.
    pub url: String,
    /// PEM CA certificate(s) of the peer's area, pinned to that area.
    pub ca: PathBuf,
    /// Revocation lists published by the peer's CA: a peer gateway
    /// certificate on one is refused, whichever side connects.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// The peer's policy verification key, `ed25519:<base64>`: when set,
    /// messages from the peer must cite its current signed policy.
    #[serde(default)]
    pub policy_key: Option<String>,
}

/// One person in the directory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User id, as in the certificate `spiffe://<area>/user/<id>`.
    pub id: UserId,
    /// Organisation, e.g. `southvale-childrens-services`.
    pub organisation: String,
    /// Role, e.g. `social-worker`, `police-officer`.
    pub role: String,
    /// Teams the user belongs to.
    #[serde(default)]
    pub teams: Vec<TeamId>,
}

/// The directory: who is in this area and in which teams.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: BTreeMap<UserId, UserConfig>,
    teams: BTreeMap<TeamId, BTreeSet<UserId>>,
}

impl Directory {
    /// Builds the directory from the configured users.
    pub fn new(users: &[UserConfig]) -> Directory {
        let mut d = Directory::default();
        for u in users {
            for t in &u.teams {
                d.teams.entry(t.clone()).or_default().insert(u.id.clone());
            }
            d.users.insert(u.id.clone(), u.clone());
        }
        d
    }

    /// A user's entry.
    pub fn user(&self, id: &UserId) -> Option<&UserConfig> {
        self.users.get(id)
    }

    /// Whether the team exists (has members).
    pub fn has_team(&self, id: &TeamId) -> bool {
        self.teams.contains_key(id)
    }

    /// The members of a recipient target here: the user, or the team's members.
    pub fn members(&self, target: &proto::Target) -> Vec<UserId> {
        match target {
            proto::Target::User(u) if self.users.contains_key(u) => vec![u.clone()],
            proto::Target::User(_) => Vec::new(),
            proto::Target::Team(t) => self
                .teams
                .get(t)
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Every member of every team, as (team, user).
    pub fn memberships(&self) -> Vec<(TeamId, UserId)> {
        self.teams
            .iter()
            .flat_map(|(t, members)| members.iter().map(move |u| (t.clone(), u.clone())))
            .collect()
    }

    /// Whether a recipient target exists here.
    pub fn has_target(&self, target: &proto::Target) -> bool {
        match target {
            proto::Target::User(u) => self.users.contains_key(u),
            proto::Target::Team(t) => self.has_team(t),
        }
    }
}

impl Config {
    /// Reads and checks a configuration file; relative paths become relative
    /// to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, path, base)
    }

    /// Parses configuration text; `path` names it in errors and `base`
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut config.data_dir);
        abs(&mut config.tls.cert);
        abs(&mut config.tls.key);
        abs(&mut config.tls.ca);
        config.tls.crls.iter_mut().for_each(abs);
        for p in &mut config.peers {
            abs(&mut p.ca);
            p.crls.iter_mut().for_each(abs);
        }
        if let Some(p) = &mut config.policy {
            abs(&mut p.file);
        }
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for p in &self.peers {
            if p.area == self.area {
                return Err(format!("peers: area {} is this gateway's own area", p.area));
            }
            if !seen.insert(&p.area) {
                return Err(format!("peers: area {} is listed twice", p.area));
            }
            if !p.url.starts_with("https://") {
                return Err(format!("peers.{}.url: must start with https://", p.area));
            }
        }
        if self.tls.crl_check_every.is_zero() {
            return Err("tls.crl_check_every: must be > 0".into());
        }
        let mut ids = BTreeSet::new();
        for u in &self.users {
            if !ids.insert(&u.id) {
                return Err(format!("users: id {} is listed twice", u.id));
            }
        }
        let d = &self.delivery;
        // A peer takes at most this many items in one batch.
        if !(1..=MAX_BATCH_ITEMS).contains(&d.batch_max_items) {
            return Err(format!(
                "delivery.batch_max_items: must be from 1 to {MAX_BATCH_ITEMS}"
            ));
        }
        let day = Duration::from_secs(86_400);
        if d.message_validity < Duration::from_secs(1) || d.message_validity > 365 * day {
            return Err("delivery.message_validity: must be from 1s to 365 days".into());
        }
        if d.peer_timeout < Duration::from_secs(1) || d.peer_timeout > Duration::from_secs(3600) {
            return Err("delivery.peer_timeout: must be from 1s to 1h".into());
        }
        if d.retry_max > day {
            return Err("delivery.retry_max: must be at most 1 day".into());
        }
        if !(1..=64).contains(&d.batches_in_flight) {
            return Err("delivery.batches_in_flight: must be from 1 to 64".into());
        }
        if d.retry_initial.is_zero() || d.retry_max < d.retry_initial {
            return Err("delivery.retry_initial must be > 0 and <= delivery.retry_max".into());
        }
        if self.retention.erase_every.is_zero() {
            return Err("retention.erase_every: must be > 0".into());
        }
        let l = &self.limits;
        if l.user_requests_per_second == 0 || l.peer_requests_per_second == 0 {
            return Err("limits: requests_per_second must be at least 1".into());
        }
        if l.max_body_bytes == 0 {
            return Err("limits.max_body_bytes: must be at least 1".into());
        }
        if !(1..=MAX_CONNECTIONS).contains(&l.max_connections) {
            return Err(format!(
                "limits.max_connections: must be from 1 to {MAX_CONNECTIONS}"
            ));
        }
        if l.max_inbox_wait > Duration::from_secs(3600) {
            return Err("limits.max_inbox_wait: must be at most 1h".into());
        }
        if l.idle_timeout < Duration::from_secs(1) || l.idle_timeout > Duration::from_secs(3600) {
            return Err("limits.idle_timeout: must be from 1s to 1h".into());
        }
        if l.body_timeout < Duration::from_secs(1) || l.body_timeout > Duration::from_secs(3600) {
            return Err("limits.body_timeout: must be from 1s to 1h".into());
        }
        Ok(())
    }

    /// The peer configured for `area`, if any.
    pub fn peer(&self, area: &AreaId) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| &p.area == area)
    }
}

#[cfg(test)]
mod tests;
