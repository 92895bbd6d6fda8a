//! HTTP clients for the federation peers.
//!
//! Each peer's client verifies the peer's certificate against its pinned CA
//! and the revocation lists in force (see [`crate::revocation`]). A pooled
//! connection, though, was verified when it was opened: when the lists
//! change, or a peer certificate one of its connections was opened with
//! has passed its `notAfter`, the peer's client is built afresh at its next
//! use, so no connection opened before a revocation or with a certificate
//! since expired carries another request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use certs::{Credentials, PeerTrust, Revocations};
use proto::AreaId;

use crate::GatewayError;

/// One peer's client, as built at one generation of the revocation lists.
struct PeerClient {
    trust: PeerTrust,
    url: String,
    current: Mutex<Current>,
}

/// A peer's client in use: the revocation lists' generation it was built
/// at, and the earliest `notAfter` of the peer certificates it accepted.
struct Current {
    generation: u64,
    client: reqwest::Client,
    accepted: certs::ServerNotAfter,
}

/// The clients of every configured peer.
pub(crate) struct PeerClients {
    revocations: Revocations,
    timeout: Duration,
    /// The gateway's certificate and each peer's client, replaced whole
    /// when a reload brings new certificates.
    current: RwLock<Arc<Clients>>,
}

/// The gateway's own certificate and a client per peer built with it.
struct Clients {
    own: Credentials,
    peers: HashMap<AreaId, PeerClient>,
}

fn build(
    own: &Credentials,
    trust: &PeerTrust,
    revocations: &Revocations,
    timeout: Duration,
) -> Result<Current, GatewayError> {
    let generation = revocations.generation();
    let accepted = certs::ServerNotAfter::default();
    let tls = certs::gateway_client_config(own, trust, revocations, &accepted)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        // Below the peer's default `limits.idle_timeout` (60 s), so that a
        // connection is retired here before the peer closes it.
        .pool_idle_timeout(crate::CLIENT_POOL_IDLE)
        .build()
        .map_err(|e| GatewayError::PeerClient {
            peer: trust.area.clone(),
            message: e.to_string(),
        })?;
    Ok(Current {
        generation,
        client,
        accepted,
    })
}

impl Clients {
    fn build(
        own: Credentials,
        peers: impl IntoIterator<Item = (PeerTrust, String)>,
        revocations: &Revocations,
        timeout: Duration,
    ) -> Result<Clients, GatewayError> {
        let mut map = HashMap::new();
        for (trust, url) in peers {
            let current = build(&own, &trust, revocations, timeout)?;
            map.insert(
                trust.area.clone(),
                PeerClient {
                    trust,
                    url,
                    current: Mutex::new(current),
                },
            );
        }
        Ok(Clients { own, peers: map })
    }
}

impl PeerClients {
    /// Builds a client for each peer (`url` without a trailing `/`).
    pub(crate) fn new(
        own: Credentials,
        peers: impl IntoIterator<Item = (PeerTrust, String)>,
        revocations: Revocations,
        timeout: Duration,
    ) -> Result<PeerClients, GatewayError> {
        let clients = Clients::build(own, peers, &revocations, timeout)?;
        Ok(PeerClients {
            revocations,
            timeout,
            current: RwLock::new(Arc::new(clients)),
        })
    }

    /// New clients for `peers` (each with its CA and base URL) and the
    /// gateway's certificate `own`, checked by building them; put in force
    /// with [`PeerClients::put`].
    pub(crate) fn prepare(
        &self,
        own: Credentials,
        peers: Vec<(PeerTrust, String)>,
    ) -> Result<PreparedClients, GatewayError> {
        Clients::build(own, peers, &self.revocations, self.timeout).map(PreparedClients)
    }

    fn clients(&self) -> Arc<Clients> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts prepared clients in force: the next request to each peer uses
    /// them (requests on the wire finish on the old ones).
    pub(crate) fn put(&self, prepared: PreparedClients) {
        let new = Arc::new(prepared.0);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }

    /// The client for `area` and its base URL, or `None` for an area that
    /// is not a peer.
    pub(crate) fn get(&self, area: &AreaId) -> Option<(reqwest::Client, String)> {
        let clients = self.clients();
        let peer = clients.peers.get(area)?;
        let generation = self.revocations.generation();
        let mut current = peer
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired = current
            .accepted
            .passed(i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX));
        if current.generation != generation || expired {
            // The lists changed, or a certificate a pooled connection was
            // opened with has expired: drop the pool (its connections were
            // verified against the old lists, or before that time).
            if expired {
                tracing::info!(peer = %area, "a peer certificate in use expired: reconnecting");
            }
            match build(&clients.own, &peer.trust, &self.revocations, self.timeout) {
                Ok(new) => *current = new,
                // Cannot happen with a configuration that built once; the
                // old client's new connections still check the new lists
                // and the date.
                Err(e) => {
                    tracing::warn!(peer = %area, error = %e, "could not rebuild the peer's HTTP client");
                    current.generation = generation;
                }
            }
        }
        Some((current.client.clone(), peer.url.clone()))
    }
}

/// Clients built by [`PeerClients::prepare`], not yet in force.
pub(crate) struct PreparedClients(Clients);
