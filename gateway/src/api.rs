//! The HTTPS API: user endpoints and the federation endpoint, as axum handlers.
//!
//! Boundary: every handler receives the connection's [`VerifiedPeer`], set by
//! the accept loop from the verified TLS chain; nothing in a request's
//! headers or body can change who the caller is.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use certs::{Identity, VerifiedPeer};
use proto::{
    ApiError, Envelope, ErrorCode, FederationBatch, FederationBatchResponse, FederationItem,
    InboxResponse, ItemResult, MessageId, Recipient, Sender, SubmitRequest, SubmitResponse,
};
use serde::Deserialize;

use crate::store::{
    BatchOrder, CommitToBind, Incoming, IncomingOutcome, KeyStock, Mailbox, NewKeyPackage,
    NewMessage, Orderer, Route, Store, SubmitOutcome, Submitted,
};
use crate::{now_ms, Directory, Shared};
use proto::mls::{ContentType, MlsMessageInfo};
use proto::MessageKind;

/// An error answer: HTTP status, machine code and a message for people.
#[derive(Debug)]
pub(crate) struct Failure {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// A new message refused while the disk is short of space (see
    /// `disk`): the sender keeps it and retries.
    fn disk_low(shared: &Shared) -> Failure {
        shared.metrics.refused_disk_low.inc();
        Failure::insufficient_storage(format!(
            "gateway {} is short of disk space and takes no new messages for now; \
             nothing was stored. Try again later; fetching and acknowledging go on",
            shared.config.area
        ))
    }

    /// `507`, told to retry in a minute.
    fn insufficient_storage(message: impl Into<String>) -> Failure {
        Failure {
            retry_after: Some(DISK_LOW_RETRY_AFTER),
            ..Failure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::InsufficientStorage,
                message,
            )
        }
    }

    fn stale_epoch(newest: u64) -> Failure {
        Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::StaleEpoch,
            format!("another Commit was already accepted for this epoch (newest Commit epoch {newest}); process pending messages and retry"),
        )
    }

    fn unproven_commit(why: &str) -> Failure {
        Failure::new(
            StatusCode::FORBIDDEN,
            ErrorCode::UnprovenCommit,
            format!("this Commit was refused: {why}. A member of the case's current epoch proves its Commits (a client from before this must be updated); nothing was stored"),
        )
    }

    fn epoch_ahead(newest: u64) -> Failure {
        Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::Rejected,
            format!("a Commit for an epoch past the next of its group (newest Commit epoch {newest}): refused"),
        )
    }

    fn internal(e: impl std::fmt::Display) -> Failure {
        tracing::error!(error = %e, "internal error");
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error; nothing was changed",
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = Json(ApiError {
            error: self.code,
            message: self.message,
        });
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE
            || self.code == ErrorCode::CertificateRevoked
            || self.code == ErrorCode::CertificateExpired
            || self.code == ErrorCode::RequestTimeout
        {
            // The rest of the request body is not read, so the connection
            // cannot carry another request: say so, or a client may reuse it
            // and see its next request fail. A connection whose certificate
            // was revoked carries nothing more. (HTTP/2 drops this header.)
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// The answer to a request on a connection whose certificate has been
/// revoked, or has expired, since it was opened (the connection is then
/// closed).
pub(crate) fn revoked(e: &certs::CertError) -> Response {
    revoked_failure(e).into_response()
}

/// Counts and logs a request refused for its connection's certificate,
/// revoked or expired since the connection was opened.
pub(crate) fn count_refusal(shared: &Shared, peer: &VerifiedPeer, e: &certs::CertError) {
    if let certs::CertError::ExpiredSince { .. } = e {
        shared.metrics.refused_expired.inc();
        tracing::warn!(%peer, error = %e, "request on a connection whose certificate has since expired");
    } else {
        shared.metrics.refused_revoked.inc();
        tracing::warn!(%peer, error = %e, "request on a connection whose certificate has since been revoked");
    }
}

fn revoked_failure(e: &certs::CertError) -> Failure {
    let code = match e {
        certs::CertError::ExpiredSince { .. } => ErrorCode::CertificateExpired,
        _ => ErrorCode::CertificateRevoked,
    };
    Failure::new(
        StatusCode::FORBIDDEN,
        code,
        format!("{e}: ask your area's gateway administrator for a new certificate"),
    )
}

/// What a sender refused for want of disk space is told to wait.
const DISK_LOW_RETRY_AFTER: Duration = Duration::from_secs(60);

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Failure {
        match e {
            // The peer starts a new session from its last answer.
            crate::store::StoreError::OutOfOrder(m) => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
            }
            crate::store::StoreError::Erased(at_ms) => Failure::new(
                StatusCode::GONE,
                ErrorCode::Erased,
                format!(
                    "this message was acknowledged and its ciphertext erased on {} \
                     (this gateway keeps acknowledged messages for retention.keep_acknowledged)",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(at_ms)
                    )
                ),
            ),
            // The disk filled faster than the reserve was checked, or a
            // quota ran out: the transaction was rolled back.
            crate::store::StoreError::DiskFull(m) => {
                tracing::error!(error = %m, "disk full; the request was rolled back");
                Failure::insufficient_storage(
                    "this gateway's disk is full; nothing was changed. Try again later",
                )
            }
            e => Failure::internal(e),
        }
    }
}

/// Reads a request body, mapping a size problem to a typed error.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Failure> {
    body.map_err(|rej| {
        if let Some(slow) = crate::connection::too_slow(&rej) {
            Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestTimeout,
                format!("{slow}; nothing was done"),
            )
        } else if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                "request body is too large",
            )
        } else {
            Failure::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::MalformedRequest,
                rej.body_text(),
            )
        }
    })
}

/// Parses a JSON body, mapping size and syntax problems to typed errors.
fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Failure> {
    let bytes = read_body(body)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            format!("malformed JSON: {e}"),
        )
    })
}

/// Whether a request is in the framed encoding ([`proto::frame`]).
fn is_framed(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(proto::frame::FRAMED))
}

/// Decodes a framed body with `decode`, mapping problems to typed errors.
fn parse_framed<T>(
    body: Result<Bytes, BytesRejection>,
    decode: impl FnOnce(&[u8]) -> Result<T, proto::frame::FrameError>,
) -> Result<T, Failure> {
    let bytes = read_body(body)?;
    decode(&bytes).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            format!("malformed framed request: {e}"),
        )
    })
}

/// Builds the router.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let user_limit = shared.config.limits.max_body_bytes.saturating_mul(4) / 3 + 64 * 1024;
    let federation_limit = user_limit
        .saturating_mul(2)
        .max(crate::federation::BATCH_MAX_BYTES * 2);
    Router::new()
        .route(
            "/v1/messages",
            post(submit).layer(DefaultBodyLimit::max(user_limit)),
        )
        .route("/v1/inbox", get(inbox))
        .route("/v1/messages/{id}", get(fetch))
        .route("/v1/messages/{id}/ack", post(ack))
        .route("/v1/messages/{id}/status", get(status))
        .route(
            "/v1/federation/batch",
            post(federation_batch).layer(DefaultBodyLimit::max(federation_limit)),
        )
        .route(
            "/v1/federation/frames",
            post(federation_batch).layer(DefaultBodyLimit::max(federation_limit)),
        )
        .route("/v1/health", get(health))
        .route(
            "/v1/keypackages",
            post(upload_key_packages)
                .get(key_package_stock)
                .layer(DefaultBodyLimit::max(user_limit)),
        )
        .route("/v1/keypackages/claim", post(claim_key_packages))
        .route("/v1/federation/keypackages/claim", post(federation_claim))
        .route("/v1/federation/commits", post(federation_commit_order))
        .route("/v1/commits", post(own_commit_order))
        .route("/v1/policy", get(get_policy))
        .route("/v1/me", get(me))
        .route("/v1/federation/policy", get(federation_policy))
        .fallback(|| async { Failure::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            rate_limit,
        ))
        .with_state(shared)
}

/// Rate limits per user and per peer gateway, before anything else of the
/// request (its body included) is read: a caller over its limit costs a
/// `429` and no more.
async fn rate_limit(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limited = match req.extensions().get::<VerifiedPeer>().map(|p| p.identity()) {
        Some(Identity::User(_, user)) => shared.limit_user(user),
        Some(Identity::Gateway(area)) => shared.limit_peer(area),
        _ => Ok(()),
    };
    match limited {
        Ok(()) => next.run(req).await,
        Err(refused) => {
            let mut resp = refused.into_response();
            // The body is left unread: the connection cannot carry another
            // request, and says so rather than end with its bytes unread.
            let has_body = req.headers().contains_key(header::CONTENT_LENGTH)
                || req.headers().contains_key(header::TRANSFER_ENCODING);
            if has_body {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    }
}

// === user endpoints ===

/// The calling user and their mailbox, or Forbidden.
fn user_of(shared: &Shared, peer: &VerifiedPeer) -> Result<(Sender, Mailbox), Failure> {
    let sender = peer.as_sender().ok_or_else(|| {
        Failure::forbidden("this endpoint is for users; gateways use /v1/federation")
    })?;
    let live = shared.live();
    let Some(entry) = live.directory.user(&sender.user) else {
        return Err(Failure::forbidden(format!(
            "{peer} is not in this area's directory"
        )));
    };
    let mb = Mailbox {
        user: sender.user.clone(),
        teams: entry.teams.clone(),
    };
    Ok((sender, mb))
}

impl Shared {
    fn limit_user(&self, user: &proto::UserId) -> Result<(), Failure> {
        self.limit(&self.users_limiter, user.as_str())
    }

    fn limit_peer(&self, area: &proto::AreaId) -> Result<(), Failure> {
        self.limit(&self.peers_limiter, area.as_str())
    }

    /// One rate-limit check: 429 with `Retry-After` when over the quota.
    fn limit(
        &self,
        limiter: &governor::DefaultKeyedRateLimiter<String>,
        key: &str,
    ) -> Result<(), Failure> {
        limiter.check_key(&key.to_owned()).map_err(|not_until| {
            self.metrics.rate_limited.inc();
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            Failure {
                retry_after: Some(wait),
                ..Failure::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::RateLimited,
                    "too many requests",
                )
            }
        })
    }
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), Failure> {
    let (sender, _) = user_of(&shared, &peer)?;
    let req: SubmitRequest = if is_framed(&headers) {
        parse_framed(body, proto::frame::decode_submit)?
    } else {
        parse_json(body)?
    };
    if req.body.len() > shared.config.limits.max_body_bytes {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "body is {} bytes; this gateway accepts at most {}",
                req.body.len(),
                shared.config.limits.max_body_bytes
            ),
        ));
    }
    let hash = req.body.hash();
    // Made only when a repeat is looked for (not on the common path).
    let what = || Submitted {
        user: sender.user.clone(),
        key: req.idempotency_key.clone(),
        recipient: req.recipient.clone(),
        content_hash: hash,
        category: req.category.clone(),
    };
    // Read once: the same answer decides whether the home is asked and
    // whether the store takes something new.
    let low = shared.disk.is_low();
    let checked = async {
        let route = route_for(&shared, &req.recipient)?;
        // Opaque bytes may be anything, referral content included: under
        // a sharing policy they declare what they disclose, as MLS
        // application messages do. Only MLS handshake messages (Welcome,
        // Commit, Proposal) carry none.
        let (commit, content) = match req.kind {
            MessageKind::Opaque => (None, true),
            MessageKind::Mls => check_mls(&req.body.0)?,
        };
        check_proof(req.commit_proof.as_ref(), commit.as_ref(), &hash)?;
        check_disclosure(&shared, &peer, &sender, &req, content)?;
        Ok::<_, Failure>((route, commit))
    }
    .await;
    let (route, commit) = match checked {
        Ok(checked) => checked,
        // A repeat of a submission stored before (its answer lost) is
        // answered as one, whatever has changed since (the directory, the
        // policy, the peers): what was stored is never refused.
        Err(refusal) => {
            return match shared.store.prior_submission(what()).await? {
                Some(prior) => answer(
                    &shared,
                    prior,
                    &req.recipient,
                    &route_of(&shared, &req.recipient),
                ),
                None => Err(refusal),
            }
        }
    };
    // Short of disk nothing new is stored here, so binding the epoch at the
    // home would hold it for nothing.
    let remote_home = |c: &CommitOf| c.home.as_ref().is_some_and(|h| *h != shared.config.area);
    let mut ordered_at_home = false;
    if let Some(c) = commit.as_ref().filter(|c| remote_home(c) && !low) {
        // Before the case's home binds an epoch: a repeat, or another
        // message under the key, is answered from what is stored, and binds
        // nothing there (the home's binding cannot be undone).
        if let Some(prior) = shared.store.prior_submission(what()).await? {
            return answer(&shared, prior, &req.recipient, &route);
        }
        ordered_at_home = order_at_home(&shared, c, &hash, req.commit_proof.as_ref()).await?;
    }
    let own = &shared.config.area;
    let commit = commit.map(|c| CommitToBind {
        orderer: if c.home.as_ref() == Some(own) {
            Orderer::Home
        } else if ordered_at_home {
            Orderer::OrderedAtHome
        } else {
            Orderer::HereAlone
        },
        group: c.group,
        epoch: c.epoch,
        proof: req.commit_proof.clone(),
    });
    let now = now_ms();
    let envelope = Envelope {
        message_id: MessageId::time_ordered(now, rand::random()),
        idempotency_key: req.idempotency_key,
        sender,
        recipient: req.recipient,
        category: req.category,
        urgent: req.urgent,
        kind: req.kind,
        disclosure: req.disclosure.clone(),
        content_hash: hash,
        accepted_at_ms: now,
        expires_at_ms: now
            .saturating_add(shared.config.delivery.message_validity.as_millis() as u64),
    };
    let outcome = shared
        .store
        .submit(NewMessage {
            envelope: envelope.clone(),
            body: req.body,
            route: route.clone(),
            commit,
            // Short of disk space, only a repeat is answered (as one): a
            // client retrying after a lost answer learns its message was stored.
            accept_new: !low,
        })
        .await?;
    if let SubmitOutcome::Stored(message_id, _) = &outcome {
        shared.metrics.submitted.inc();
        tracing::info!(%message_id, recipient = %envelope.recipient, category = %envelope.category, "accepted");
    }
    answer(&shared, outcome, &envelope.recipient, &route)
}

/// The route a message to `to` took when it was stored (for a repeat whose
/// route may no longer be configured): here, or to its area.
fn route_of(shared: &Shared, to: &Recipient) -> Route {
    if to.area == shared.config.area {
        Route::Local
    } else {
        Route::Peer(to.area.clone())
    }
}

/// The answer to a submission the store dealt with. Stored or not, the
/// message's recipient (here) or peer worker is woken: a repeat may come
/// because the first answer was cut off before the handler woke anyone.
fn answer(
    shared: &Shared,
    outcome: SubmitOutcome,
    recipient: &Recipient,
    route: &Route,
) -> Result<(StatusCode, Json<SubmitResponse>), Failure> {
    let wake = || match route {
        Route::Local => shared.inbox_changed([&recipient.target]),
        Route::Peer(area) => shared.wake_peer(area),
    };
    match outcome {
        SubmitOutcome::Stored(message_id, status) => {
            wake();
            let waiting = shared.waiting_for(&recipient.area);
            Ok((StatusCode::CREATED, Json(SubmitResponse { message_id, status, duplicate: false, waiting })))
        }
        SubmitOutcome::Duplicate(message_id, status) => {
            shared.metrics.duplicates.inc();
            tracing::info!(%message_id, "duplicate submission; nothing new stored");
            wake();
            let waiting = (status == proto::Status::Accepted)
                .then(|| shared.waiting_for(&recipient.area))
                .flatten();
            Ok((StatusCode::OK, Json(SubmitResponse { message_id, status, duplicate: true, waiting })))
        }
        SubmitOutcome::StaleEpoch(newest) => Err(Failure::stale_epoch(newest)),
        SubmitOutcome::EpochAhead(newest) => Err(Failure::epoch_ahead(newest)),
        SubmitOutcome::Unproven(why) => Err(Failure::unproven_commit(why)),
        SubmitOutcome::NotStored => Err(Failure::disk_low(shared)),
        SubmitOutcome::Conflict(message_id) => Err(Failure::new(
            StatusCode::CONFLICT,
            ErrorCode::IdempotencyConflict,
            format!("idempotency key was already used for message {message_id} with a different recipient, category or body"),
        )),
    }
}

fn route_for(shared: &Shared, to: &Recipient) -> Result<Route, Failure> {
    let unknown = |m: String| Failure::new(StatusCode::NOT_FOUND, ErrorCode::UnknownRecipient, m);
    if to.area == shared.config.area {
        if shared.live().directory.has_target(&to.target) {
            Ok(Route::Local)
        } else {
            Err(unknown(format!("{to} is not in this area's directory")))
        }
    } else if shared.live().peer(&to.area).is_some() {
        Ok(Route::Peer(to.area.clone()))
    } else {
        Err(unknown(format!(
            "area {} is not a federation peer of {}",
            to.area, shared.config.area
        )))
    }
}

#[derive(Debug, Deserialize)]
struct InboxQuery {
    /// Seconds to wait for a message when the inbox is empty.
    #[serde(default)]
    wait: u64,
}

async fn inbox(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    cert: Option<Extension<Arc<certs::ConnectionCertificate>>>,
    activity: Option<Extension<Arc<crate::connection::Activity>>>,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InboxResponse>, Failure> {
    let (_, mut mb) = user_of(&shared, &peer)?;
    let Query(q) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            e.body_text(),
        )
    })?;
    let mut wait = Duration::from_secs(q.wait).min(shared.config.limits.max_inbox_wait);
    // The answer comes before the connection's certificate expires.
    if let Some(Extension(cert)) = &cert {
        wait = wait.min(cert.valid_for());
    }
    // Past a few waiting at once for one user, a listing is answered at once.
    let _slot = if wait.is_zero() {
        None
    } else {
        let slot = shared.polls.take(&mb.user);
        if slot.is_none() {
            wait = Duration::ZERO;
        }
        slot
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut waiter = shared.inbox_watch.waiter(&mb);
    let mut stop = shared.stop.subscribe();
    loop {
        // Marked before listing: a message stored meanwhile for this
        // mailbox still wakes the wait below.
        waiter.mark_seen();
        shared.metrics.inbox_listings.inc();
        let messages = shared.store.inbox(mb.clone(), 500).await?;
        if !messages.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(InboxResponse { messages }));
        }
        // Only a message for this mailbox's user or teams wakes it.
        let _waiting = shared.metrics.inbox_waiting.hold();
        tokio::select! {
            () = waiter.wait() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = crate::stopped(&mut stop) => return Ok(Json(InboxResponse { messages })),
        }
        // The certificate may have been revoked while it waited.
        if let Some(Extension(cert)) = &cert {
            if let Err(e) = cert.check(shared.crls.revocations()) {
                count_refusal(&shared, &peer, &e);
                // The connection carries nothing more (HTTP/2 included,
                // where `Connection: close` means nothing).
                if let Some(Extension(activity)) = &activity {
                    activity.end();
                }
                return Err(revoked_failure(&e));
            }
        }
        // The directory may have changed while it waited (a reload): a
        // leaver is refused, and a listing is of the teams she is in now.
        let live = shared.live();
        let Some(entry) = live.directory.user(&mb.user) else {
            return Err(Failure::forbidden(format!(
                "{peer} is not in this area's directory"
            )));
        };
        if entry.teams != mb.teams {
            mb.teams = entry.teams.clone();
            waiter = shared.inbox_watch.waiter(&mb);
        }
    }
}

fn message_id(raw: &str) -> Result<MessageId, Failure> {
    MessageId::new(raw).map_err(|_| Failure::not_found("no such message"))
}

async fn fetch(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    Path(id): Path<String>,
) -> Result<Json<proto::FetchResponse>, Failure> {
    let (_, mb) = user_of(&shared, &peer)?;
    let id = message_id(&id)?;
    let (envelope, body) = shared
        .store
        .fetch(mb, id, now_ms())
        .await?
        .ok_or_else(|| Failure::not_found("no such message in your inbox"))?;
    shared.wake_peer(&envelope.sender.area);
    tracing::info!(message_id = %envelope.message_id, "fetched");
    Ok(Json(proto::FetchResponse { envelope, body }))
}

async fn ack(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let (_, mb) = user_of(&shared, &peer)?;
    let id = message_id(&id)?;
    let body = read_body(body)?;
    let req: proto::AckRequest = if body.is_empty() {
        proto::AckRequest::default()
    } else {
        parse_json(Ok(body))?
    };
    if req.not_in_case {
        let status = shared
            .store
            .not_in_case(mb, id.clone(), now_ms())
            .await?
            .ok_or_else(|| {
                Failure::not_found("no such encrypted message to your team in your inbox")
            })?;
        // It may have been given up (no one it was for read it): the
        // sender's area then has news.
        shared.wake_all_peers();
        tracing::info!(message_id = %id, "set aside: not in its case");
        return Ok(Json(
            serde_json::json!({ "message_id": id, "status": status }),
        ));
    }
    let status = shared
        .store
        .ack(mb, id.clone(), now_ms())
        .await?
        .ok_or_else(|| Failure::not_found("no such message in your inbox"))?;
    // The sender's area: ask the store would cost a read; waking every peer is cheap.
    shared.wake_all_peers();
    // No long-poll is woken: an acknowledgement only takes messages away,
    // and a long-poll waits only while its mailbox lists nothing.
    tracing::info!(message_id = %id, "acknowledged");
    Ok(Json(
        serde_json::json!({ "message_id": id, "status": status }),
    ))
}

async fn status(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    Path(id): Path<String>,
) -> Result<Json<proto::StatusResponse>, Failure> {
    let (sender, _) = user_of(&shared, &peer)?;
    let id = message_id(&id)?;
    let mut st = shared
        .store
        .status(sender.user, id)
        .await?
        .ok_or_else(|| Failure::not_found("no such message sent by you"))?;
    // Still queued for a peer that keeps failing: say so, so that the
    // sender can act (phone the other area) instead of waiting blind.
    if st.status == proto::Status::Accepted {
        st.waiting = shared.waiting_for(&st.recipient.area);
    }
    Ok(Json(st))
}

async fn health(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
) -> Response {
    match shared.store.fault() {
        // Serving, but taking no new messages: an operator must make room.
        None if shared.disk.is_low() => Json(serde_json::json!({
            "status": "degraded",
            "reason": format!(
                "disk space below limits.min_free_disk_mib ({} MiB): new messages are refused; fetching, acknowledging and status go on",
                shared.config.limits.min_free_disk_mib
            ),
            "you": peer.to_string(),
        }))
        .into_response(),
        None => Json(serde_json::json!({ "status": "ok", "you": peer.to_string() })).into_response(),
        // An operator's probe sees what is wrong; nothing is being acknowledged.
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "failing", "reason": reason, "you": peer.to_string() })),
        )
            .into_response(),
    }
}

// === federation endpoint ===

/// The calling peer gateway's area, or Forbidden (the federation endpoints'
/// counterpart of [`user_of`]).
fn peer_of(shared: &Shared, peer: &VerifiedPeer) -> Result<proto::AreaId, Failure> {
    match peer.identity() {
        Identity::Gateway(a) if shared.live().peer(a).is_some() => Ok(a.clone()),
        _ => Err(Failure::forbidden(format!(
            "{peer} is not a federation peer of {}",
            shared.config.area
        ))),
    }
}

/// Most items in one federation request.
const MAX_FRAMED_ITEMS: usize = crate::config::MAX_BATCH_ITEMS;

/// `POST /v1/federation/frames` (framed, bodies raw) and
/// `POST /v1/federation/batch` (JSON, bodies in base64): a peer's batch. The
/// encoding is chosen by the request's content type.
async fn federation_batch(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let area = peer_of(&shared, &peer)?;
    let order = batch_order(&headers)?;
    // Framed, an item that cannot be read is refused alone (a gateway of
    // another version may send one this one does not know), so it does not
    // hold up the peer's queue.
    let items: Vec<Result<FederationItem, String>> = if is_framed(&headers) {
        parse_framed(body, |b| {
            proto::frame::decode_each_item(b, MAX_FRAMED_ITEMS)
        })?
        .into_iter()
        .map(|i| i.map_err(|e| e.to_string()))
        .collect()
    } else {
        parse_json::<FederationBatch>(body)?
            .items
            .into_iter()
            .map(Ok)
            .collect()
    };
    if items.len() > MAX_FRAMED_ITEMS {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            format!("a batch holds at most {MAX_FRAMED_ITEMS} items"),
        ));
    }
    let answer = accept_items(&shared, area, items, order).await?;
    let mut resp = answer.into_response();
    if order.is_some() {
        resp.headers_mut()
            .insert(proto::frame::ORDERED_HEADER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// How long a pipelined batch waits for its predecessor before it is
/// refused (the peer then starts a new session from its last answer).
const ORDER_PATIENCE: Duration = Duration::from_secs(10);

/// A pipelined batch's session and number, from its headers (both or none).
fn batch_order(headers: &HeaderMap) -> Result<Option<(u64, u64)>, Failure> {
    let number = |name: &str| -> Result<Option<u64>, Failure> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        Failure::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::MalformedRequest,
                            format!("header {name} must be a decimal number"),
                        )
                    })
            })
            .transpose()
    };
    match (
        number(proto::frame::SESSION_HEADER)?,
        number(proto::frame::BATCH_HEADER)?,
    ) {
        (None, None) => Ok(None),
        (Some(session), Some(batch)) if batch >= 1 => Ok(Some((session, batch))),
        _ => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            format!(
                "headers {} and {} come together, with a batch number from 1",
                proto::frame::SESSION_HEADER,
                proto::frame::BATCH_HEADER
            ),
        )),
    }
}

/// Checks and stores a peer's items, answering for each in order.
async fn accept_items(
    shared: &Shared,
    area: proto::AreaId,
    items: Vec<Result<FederationItem, String>>,
    order: Option<(u64, u64)>,
) -> Result<Json<FederationBatchResponse>, Failure> {
    let n = items.len();
    let mut results: Vec<Option<ItemResult>> = vec![None; n];
    let mut valid = Vec::with_capacity(n);
    let mut index = Vec::with_capacity(n);
    // One directory for the whole batch.
    let live = shared.live();
    let mut policy: PolicyMemo = None;
    for (i, item) in items.into_iter().enumerate() {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                tracing::warn!(peer = %area, "refused a federation item this gateway cannot read");
                results[i] = Some(ItemResult::Rejected {
                    code: ErrorCode::MalformedRequest,
                    reason: format!(
                        "this gateway cannot read it (it may run another version): {e}"
                    ),
                });
                continue;
            }
        };
        let id = match &item {
            FederationItem::Deliver { envelope, .. } => Some(envelope.message_id.clone()),
            FederationItem::Status { .. } => None,
        };
        let checked = match check_item(shared, &live.directory, &area, item) {
            Ok(Incoming::Deliver(env, body)) => match &env.disclosure {
                None => Ok(Incoming::Deliver(env, body)),
                Some(d) => match check_incoming_policy(shared, &area, d, &mut policy).await {
                    Ok(()) => Ok(Incoming::Deliver(env, body)),
                    Err(PolicyCheck::Refused(reason)) => {
                        tracing::warn!(peer = %area, "refused federation item: it does not cite the peer's current sharing policy");
                        Err(ItemResult::Rejected {
                            code: ErrorCode::PolicyDenied,
                            reason,
                        })
                    }
                    // Not the item's fault: the peer sends the batch again later.
                    Err(PolicyCheck::Unavailable(reason)) => {
                        tracing::warn!(peer = %area, %reason, "federation batch refused for now: the peer's sharing policy could not be fetched");
                        return Err(Failure::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            ErrorCode::Unavailable,
                            reason,
                        ));
                    }
                },
            },
            Ok(incoming) => Ok(incoming),
            Err(rejected) => {
                if let ItemResult::Rejected { code, .. } = &rejected {
                    tracing::warn!(peer = %area, ?code, "refused federation item");
                }
                Err(rejected)
            }
        };
        match checked {
            Ok(incoming) => {
                // Whom it is for, when it is a message (a status is for no inbox).
                let target = match &incoming {
                    Incoming::Deliver(env, _) => Some(env.recipient.target.clone()),
                    Incoming::Status(..) | Incoming::Refused(_) => None,
                };
                valid.push(incoming);
                index.push((i, target));
            }
            // A refused message still goes to the store: a repeat of one
            // stored before (its answer lost) is a duplicate, not a refusal,
            // even if the directory, the policy or the clock has moved on
            // since. The store looks in its own order, so it also finds an
            // original queued just before this batch and not yet committed.
            Err(rejected) => {
                results[i] = Some(rejected);
                if let Some(id) = id {
                    valid.push(Incoming::Refused(id));
                    index.push((i, None));
                }
            }
        }
    }
    let mut stored_for = Vec::new();
    // A pipelined batch waits until its session's earlier batches are in the
    // store's queue (checking above ran meanwhile), so it is queued, and
    // stored, in the peer's order; the store checks that order again in the
    // batch's own transaction.
    let turn = match order {
        Some((session, batch)) => {
            let unavailable = |m: String| {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
            };
            let mut stop = shared.stop.subscribe();
            tokio::select! {
                t = shared.sequencer.turn(&area, session, batch, ORDER_PATIENCE) => Some(t.map_err(|e| {
                    tracing::info!(peer = %area, error = %e, "pipelined batch refused");
                    unavailable(e.to_string())
                })?),
                // A waiting batch does not hold up a shutdown.
                _ = crate::stopped(&mut stop) => return Err(unavailable("shutting down".into())),
            }
        }
        None => None,
    };
    // Short of disk space, a batch with messages in it is refused whole
    // (after its turn, so that its session breaks at once and the later
    // batches are refused too): the peer keeps it queued and retries. A
    // batch of status updates only is small, and is taken.
    if shared.disk.is_low() && valid.iter().any(|i| matches!(i, Incoming::Deliver(..))) {
        if let Some(turn) = turn {
            turn.done(false);
        }
        return Err(Failure::disk_low(shared));
    }
    let order = order.map(|(session, batch)| BatchOrder { session, batch });
    let queued = shared.store.queue_batch(area.clone(), valid, order).await;
    if let Some(turn) = turn {
        turn.done(queued.is_ok());
    }
    let outcomes = queued?.await.inspect_err(|e| {
        tracing::info!(peer = %area, error = %e, "federation batch not stored");
    })?;
    for ((i, target), outcome) in index.into_iter().zip(outcomes) {
        results[i] = Some(match outcome {
            IncomingOutcome::Stored => {
                stored_for.extend(target);
                ItemResult::Stored
            }
            // A repeat may come because the first request was cut off
            // before its handler woke anyone: wake them now.
            IncomingOutcome::Duplicate => {
                stored_for.extend(target);
                ItemResult::Duplicate
            }
            IncomingOutcome::Conflict => ItemResult::Rejected {
                code: ErrorCode::IdempotencyConflict,
                reason: "another message was delivered here under its id".into(),
            },
            IncomingOutcome::UnknownMessage => ItemResult::Rejected {
                code: ErrorCode::NotFound,
                reason: "no such message was sent to your area".into(),
            },
            // The checks' refusal, set above, stands.
            IncomingOutcome::Refused => continue,
        });
    }
    shared.metrics.federation_items_received.add(n as u64);
    if !stored_for.is_empty() {
        shared.inbox_changed(&stored_for);
    }
    let results = results
        .into_iter()
        .map(|r| {
            r.unwrap_or(ItemResult::Rejected {
                code: ErrorCode::Internal,
                reason: "not processed".into(),
            })
        })
        .collect();
    Ok(Json(FederationBatchResponse { results }))
}

/// How far apart two gateways' clocks may be when one judges whether a
/// message from the other expired on its way.
const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

fn check_item(
    shared: &Shared,
    directory: &Directory,
    peer: &proto::AreaId,
    item: FederationItem,
) -> Result<Incoming, ItemResult> {
    let reject = |code, reason: String| ItemResult::Rejected { code, reason };
    match item {
        FederationItem::Deliver { envelope, body } => {
            if &envelope.sender.area != peer {
                return Err(reject(
                    ErrorCode::Forbidden,
                    format!("sender area {} is not your area", envelope.sender.area),
                ));
            }
            if envelope.recipient.area != shared.config.area {
                return Err(reject(
                    ErrorCode::UnknownRecipient,
                    format!(
                        "recipient area {} is not {}",
                        envelope.recipient.area, shared.config.area
                    ),
                ));
            }
            if !directory.has_target(&envelope.recipient.target) {
                return Err(reject(
                    ErrorCode::UnknownRecipient,
                    format!(
                        "{} is not in the directory of {}",
                        envelope.recipient, shared.config.area
                    ),
                ));
            }
            if body.len() > shared.config.limits.max_body_bytes {
                return Err(reject(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "body is larger than {} bytes",
                        shared.config.limits.max_body_bytes
                    ),
                ));
            }
            // A message whose validity ran out on its way is refused (its
            // sender's gateway returns it to its sender), allowing for
            // clocks a few minutes apart.
            if envelope.expires_at_ms.saturating_add(CLOCK_SKEW_MS) < now_ms() {
                return Err(reject(
                    ErrorCode::Rejected,
                    format!(
                        "its validity ran out before it reached {}",
                        shared.config.area
                    ),
                ));
            }
            if body.hash() != envelope.content_hash {
                return Err(reject(
                    ErrorCode::Rejected,
                    "body does not match the envelope's content hash".into(),
                ));
            }
            Ok(Incoming::Deliver(envelope, body))
        }
        FederationItem::Status {
            message_id,
            status,
            at_ms,
        } => Ok(Incoming::Status(message_id, status, at_ms)),
    }
}

// === MLS delivery service ===

/// Checks an MLS message's public framing. Returns the group and epoch of a
/// Commit, which the store checks for order.
/// Also says whether it is an application message (referral content).
fn check_mls(body: &[u8]) -> Result<(Option<CommitOf>, bool), Failure> {
    let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, ErrorCode::MalformedRequest, m);
    let info =
        MlsMessageInfo::parse(body).map_err(|e| bad(format!("not a valid MLS message: {e}")))?;
    match &info {
        MlsMessageInfo::PublicMessage(m) | MlsMessageInfo::PrivateMessage(m) => {
            match m.content_type() {
                ContentType::Commit => Ok((
                    Some(CommitOf {
                        group: hex::encode(m.group_id()),
                        epoch: m.epoch(),
                        home: proto::mls::home_of_group(m.group_id()),
                    }),
                    false,
                )),
                ContentType::Application => Ok((None, true)),
                ContentType::Proposal => Ok((None, false)),
            }
        }
        MlsMessageInfo::Welcome(_) => Ok((None, false)),
        MlsMessageInfo::GroupInfo(_) | MlsMessageInfo::KeyPackage(_) => Err(bad(
            "KeyPackages are published with /v1/keypackages; GroupInfo is not relayed".into(),
        )),
    }
}

/// A Commit's proof, if one came, must be well formed and show that its
/// maker holds the key it names for the next epoch (checked before
/// anything is asked or stored; the rest needs the stored key), and only a
/// Commit comes with one.
fn check_proof(
    proof: Option<&proto::CommitProof>,
    commit: Option<&CommitOf>,
    hash: &proto::ContentHash,
) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, ErrorCode::MalformedRequest, m);
    match (proof, commit) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(bad("commit_proof: only an MLS Commit comes with one".into())),
        (Some(p), Some(c)) => match p.next_key(&c.group, c.epoch, hash) {
            Ok(_) => Ok(()),
            Err(e @ proto::mls::ProofError::Malformed(_)) => Err(bad(e.to_string())),
            Err(e) => Err(Failure::unproven_commit(&e.to_string())),
        },
    }
}

/// A Commit, as its framing shows it to the delivery service.
struct CommitOf {
    /// Its group id, hex.
    group: String,
    /// The epoch it was made in.
    epoch: u64,
    /// The group's home area, if its id names one.
    home: Option<proto::AreaId>,
}

/// Before a Commit is taken here for a group whose home is another area,
/// that area's gateway binds the epoch to it: Commits that members make
/// through different gateways for the same epoch are ordered in one place,
/// so the second is refused `stale_epoch` wherever it was made, rather than
/// forking the group. Here, or a group with no home named, the local record
/// alone decides (in the store). True if the home bound it; false if the
/// home cannot be asked (not a peer, or a version without the endpoint)
/// and the local record alone decides.
async fn order_at_home(
    shared: &Shared,
    commit: &CommitOf,
    hash: &proto::ContentHash,
    proof: Option<&proto::CommitProof>,
) -> Result<bool, Failure> {
    let Some(home) = commit.home.as_ref().filter(|h| **h != shared.config.area) else {
        return Ok(false);
    };
    let unavailable = |m: String| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("{m}; nothing was stored: retry later"),
        )
    };
    let Some((client, url)) = shared.peer_clients.get(home) else {
        // A home this gateway cannot ask (not a peer: no member here should
        // be in its case) must not hold the case's changes for good: the
        // local record alone orders them, as for a group with no home.
        tracing::warn!(%home, "a Commit for a group whose home area is not a federation peer: ordered here only");
        return Ok(false);
    };
    let mut order = proto::CommitOrder {
        group_id: commit.group.clone(),
        epoch: commit.epoch,
        content_hash: *hash,
        proof: proof.cloned(),
    };
    let ask = |order: &proto::CommitOrder| {
        client
            .post(format!("{url}/v1/federation/commits"))
            .json(order)
            .send()
    };
    let unreachable = |e: reqwest::Error| {
        unavailable(format!(
            "the case's home gateway ({home}) could not be reached to order this change: {e}"
        ))
    };
    // The status and, if refused, why.
    let answer = |resp: reqwest::Response| async move {
        let status = resp.status();
        let refusal: Option<ApiError> = if status.is_success() {
            None
        } else {
            resp.json().await.ok()
        };
        (status, refusal)
    };
    let (mut status, mut refusal) = answer(ask(&order).await.map_err(unreachable)?).await;
    let unknown_proof = |e: &ApiError| {
        e.error == ErrorCode::MalformedRequest && e.message.contains("unknown field `proof`")
    };
    if order.proof.is_some() && refusal.as_ref().is_some_and(unknown_proof) {
        // A home from before proofs refuses the field it does not know: it
        // orders the Commit as it did before, without it. (Any other
        // refusal stands: the proof is not dropped for it.)
        tracing::warn!(%home, "the home gateway does not read Commit proofs (an older version): asked without");
        order.proof = None;
        (status, refusal) = answer(ask(&order).await.map_err(unreachable)?).await;
    }
    if status.is_success() {
        return Ok(true);
    }
    match refusal {
        Some(e) if e.error == ErrorCode::StaleEpoch || e.error == ErrorCode::Rejected => {
            Err(Failure::new(
                StatusCode::CONFLICT,
                e.error,
                format!("the case's home gateway ({home}): {}", e.message),
            ))
        }
        Some(e) if e.error == ErrorCode::UnprovenCommit => Err(Failure::new(
            StatusCode::FORBIDDEN,
            e.error,
            format!("the case's home gateway ({home}): {}", e.message),
        )),
        // A home gateway from before this endpoint: the local record alone
        // orders the group's Commits, as before.
        Some(e) if status == reqwest::StatusCode::NOT_FOUND && e.error == ErrorCode::NotFound => {
            tracing::warn!(%home, "the home gateway does not order Commits (an older version): ordered here only");
            Ok(false)
        }
        _ => Err(unavailable(format!(
            "the case's home gateway ({home}) answered HTTP {status} when asked to order this change"
        ))),
    }
}

/// `POST /v1/federation/commits`: a peer asks this gateway, the home of a
/// group, to bind an epoch to a Commit (see [`order_at_home`]).
async fn federation_commit_order(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<proto::CommitOrdered>, Failure> {
    let area = peer_of(&shared, &peer)?;
    let order: proto::CommitOrder = parse_json(body)?;
    let epoch = order.epoch;
    let ordered = bind_at_home(&shared, order).await?;
    tracing::debug!(peer = %area, epoch, "a peer's Commit took its epoch");
    Ok(ordered)
}

/// `POST /v1/commits`: a member who has just made a group here (its home)
/// binds its first epoch to the Commit that made it, with its proof, before
/// anyone else knows the group's id: the group's next change then takes a
/// proof too (see [`proto::CommitProof`]). The Commit itself goes to no one
/// (its only member made it).
async fn own_commit_order(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<proto::CommitOrdered>, Failure> {
    user_of(&shared, &peer)?;
    let order: proto::CommitOrder = parse_json(body)?;
    if order.proof.is_none() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedRequest,
            "proof: a Commit ordered alone comes with its proof",
        ));
    }
    bind_at_home(&shared, order).await
}

/// Binds an epoch of a group whose home is this gateway to a Commit, as
/// `order` asks, checking its proof.
async fn bind_at_home(
    shared: &Shared,
    order: proto::CommitOrder,
) -> Result<Json<proto::CommitOrdered>, Failure> {
    let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, ErrorCode::MalformedRequest, m);
    let id = hex::decode(&order.group_id).map_err(|e| bad(format!("group_id: {e}")))?;
    if proto::mls::home_of_group(&id).as_ref() != Some(&shared.config.area) {
        return Err(bad(format!(
            "group {} does not name {} as its home",
            order.group_id, shared.config.area
        )));
    }
    // Recorded as this gateway's own submissions record it (lowercase hex).
    let commit = CommitOf {
        group: hex::encode(&id),
        epoch: order.epoch,
        home: Some(shared.config.area.clone()),
    };
    check_proof(order.proof.as_ref(), Some(&commit), &order.content_hash)?;
    match shared
        .store
        .order_commit(commit.group, order.epoch, order.content_hash, order.proof)
        .await?
    {
        crate::store::Bind::Bound => Ok(Json(proto::CommitOrdered { epoch: order.epoch })),
        crate::store::Bind::Stale(newest) => Err(Failure::stale_epoch(newest)),
        crate::store::Bind::Ahead(newest) => Err(Failure::epoch_ahead(newest)),
        crate::store::Bind::Unproven(why) => Err(Failure::unproven_commit(why)),
    }
}

/// Most KeyPackages one upload may carry.
const MAX_UPLOAD: usize = 100;
/// Below this many single-use KeyPackages the uploader is told to top up.
const LOW_STOCK: usize = 5;

async fn upload_key_packages(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<proto::KeyPackageStock>, Failure> {
    let (sender, _) = user_of(&shared, &peer)?;
    let upload: proto::KeyPackageUpload = parse_json(body)?;
    if upload.key_packages.len() > MAX_UPLOAD {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("at most {MAX_UPLOAD} KeyPackages per upload"),
        ));
    }
    let me = peer.identity().uri();
    let now_s = now_ms() / 1000;
    let mut kps = Vec::with_capacity(upload.key_packages.len());
    for (i, kp) in upload.key_packages.into_iter().enumerate() {
        let info = proto::mls::KeyPackageInfo::parse(&kp.0).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::MalformedRequest,
                format!("key_packages[{i}]: {e}"),
            )
        })?;
        if info.identity() != me {
            return Err(Failure::forbidden(format!(
                "key_packages[{i}]: its credential names {:?}, but your certificate is {me}",
                info.identity().chars().take(100).collect::<String>()
            )));
        }
        if !info.lifetime().contains(now_s) {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::MalformedRequest,
                format!("key_packages[{i}]: expired or not yet valid"),
            ));
        }
        kps.push(NewKeyPackage {
            kp_ref: info.key_package_ref().to_string(),
            bytes: kp.0,
            last_resort: info.is_last_resort(),
            not_after_s: info.lifetime().not_after,
        });
    }
    let stock = shared
        .store
        .put_key_packages(sender.user, kps, now_ms())
        .await?;
    Ok(Json(stock_of(stock)))
}

/// What a user is told of their published KeyPackages: low when few
/// single-use ones are left, or no last-resort one (counting only those
/// with [`crate::store::KEY_PACKAGE_RENEWAL`] of their lifetime left).
fn stock_of(stock: KeyStock) -> proto::KeyPackageStock {
    proto::KeyPackageStock {
        stored: stock.stored,
        available: stock.available,
        last_resort: stock.last_resort,
        low: stock.available < LOW_STOCK || !stock.last_resort,
    }
}

/// Claims KeyPackages of a target in this area.
async fn claim_local(
    shared: &Shared,
    target: &proto::Target,
) -> Result<proto::ClaimResponse, Failure> {
    let members = shared.live().directory.members(target);
    let claimed = shared.store.claim_key_packages(members, now_ms()).await?;
    let mut out = proto::ClaimResponse {
        key_packages: Vec::new(),
        missing: Vec::new(),
    };
    for (user, kp) in claimed {
        let identity = Identity::User(shared.config.area.clone(), user).uri();
        match kp {
            Some(kp) => out.key_packages.push(proto::ClaimedKeyPackage {
                identity,
                key_package: proto::Body(kp),
            }),
            None => out.missing.push(identity),
        }
    }
    Ok(out)
}

async fn claim_key_packages(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<proto::ClaimResponse>, Failure> {
    let _ = user_of(&shared, &peer)?;
    let req: proto::ClaimRequest = parse_json(body)?;
    let to = &req.recipient;
    let unknown = |m: String| Failure::new(StatusCode::NOT_FOUND, ErrorCode::UnknownRecipient, m);
    if to.area == shared.config.area {
        if !shared.live().directory.has_target(&to.target) {
            return Err(unknown(format!("{to} is not in this area's directory")));
        }
        return claim_local(&shared, &to.target).await.map(Json);
    }
    let Some((client, url)) = shared.peer_clients.get(&to.area) else {
        return Err(unknown(format!(
            "area {} is not a federation peer of {}",
            to.area, shared.config.area
        )));
    };
    // Claiming needs the peer now: a group cannot be made without its members' keys.
    let unavailable =
        |m: String| Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m);
    let resp = client
        .post(format!("{url}/v1/federation/keypackages/claim"))
        .json(&req)
        .send()
        .await
        .map_err(|e| unavailable(format!("peer {} unreachable: {e}", to.area)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        let e: ApiError = resp.json().await.map_err(|e| unavailable(e.to_string()))?;
        return Err(unknown(e.message));
    }
    if !status.is_success() {
        return Err(unavailable(format!(
            "peer {} answered HTTP {status}",
            to.area
        )));
    }
    let answer: proto::ClaimResponse = resp
        .json()
        .await
        .map_err(|e| unavailable(format!("peer {}: {e}", to.area)))?;
    // Only identities of the peer's own area, and only real KeyPackages for them.
    for kp in &answer.key_packages {
        let info = proto::mls::KeyPackageInfo::parse(&kp.key_package.0)
            .map_err(|e| unavailable(format!("peer {} sent a bad KeyPackage: {e}", to.area)))?;
        let ok =
            matches!(Identity::parse_uri(&kp.identity), Ok(Identity::User(a, _)) if a == to.area);
        if !ok || info.identity() != kp.identity {
            return Err(unavailable(format!(
                "peer {} sent a KeyPackage for an identity outside its area",
                to.area
            )));
        }
    }
    Ok(Json(answer))
}

async fn federation_claim(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<proto::ClaimResponse>, Failure> {
    let area = peer_of(&shared, &peer)?;
    let req: proto::ClaimRequest = parse_json(body)?;
    if req.recipient.area != shared.config.area
        || !shared.live().directory.has_target(&req.recipient.target)
    {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownRecipient,
            format!(
                "{} is not in the directory of {}",
                req.recipient, shared.config.area
            ),
        ));
    }
    tracing::info!(peer = %area, recipient = %req.recipient, "KeyPackages claimed by a peer");
    claim_local(&shared, &req.recipient.target).await.map(Json)
}

// === sharing policy ===

/// The second policy check (the client made the first): a message that
/// carries `content` (an MLS application message, or opaque bytes, which
/// may be anything) leaving a gateway that has a policy must declare its
/// disclosure, and the policy must allow it.
fn check_disclosure(
    shared: &Shared,
    peer: &VerifiedPeer,
    sender: &proto::Sender,
    req: &proto::SubmitRequest,
    content: bool,
) -> Result<(), Failure> {
    let denied = |m: String| Failure::new(StatusCode::FORBIDDEN, ErrorCode::PolicyDenied, m);
    let live = shared.live();
    let Some(own) = live.own_policy.as_deref() else {
        return match &req.disclosure {
            Some(_) => Err(denied(format!(
                "{} has no sharing policy: nothing may be disclosed",
                shared.config.area
            ))),
            None => Ok(()),
        };
    };
    let Some(d) = &req.disclosure else {
        return if content {
            Err(denied(format!(
                "under {}'s sharing policy a message carrying content must declare its \
                 disclosure (policy, purpose, fields){}",
                shared.config.area,
                match req.kind {
                    MessageKind::Opaque => "; with `client send`: --fields",
                    MessageKind::Mls => "",
                }
            )))
        } else {
            Ok(())
        };
    };
    let live = shared.live();
    let user = live
        .directory
        .user(&sender.user)
        .ok_or_else(|| Failure::forbidden("not in the directory"))?;
    let opaque = req.kind == MessageKind::Opaque;
    crate::sharing::check_outgoing(own, peer, user, &req.recipient, &req.category, d, opaque)
        .map_err(|reason| {
            // The reason goes to the caller only: it may quote what they
            // typed, and name an area a family fled.
            tracing::info!(recipient = %req.recipient, "disclosure refused by policy");
            denied(reason)
        })
}

async fn own_policy_text(shared: &Shared) -> Result<String, Failure> {
    shared
        .live()
        .own_policy
        .as_ref()
        .map(|p| p.signed_text.clone())
        .ok_or_else(|| {
            Failure::not_found(format!(
                "{} publishes no sharing policy",
                shared.config.area
            ))
        })
}

async fn get_policy(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
) -> Result<String, Failure> {
    let _ = user_of(&shared, &peer)?;
    own_policy_text(&shared).await
}

async fn federation_policy(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
) -> Result<String, Failure> {
    peer_of(&shared, &peer)?;
    own_policy_text(&shared).await
}

/// Why an incoming disclosure was not taken.
#[derive(Debug, Clone)]
enum PolicyCheck {
    /// It does not cite the peer's current policy (or the peer serves none
    /// that verifies): the item is refused.
    Refused(String),
    /// The peer's policy could not be fetched (its gateway unreachable or
    /// failing): the batch is refused for now, and sent again.
    Unavailable(String),
}

/// What one batch learnt of the peer's policy: fetched at most once, its
/// outcome (a failure included) kept for the batch's other items.
type PolicyMemo = Option<Result<(String, u32), PolicyCheck>>;

/// The largest policy document taken from a peer.
const MAX_POLICY_BYTES: usize = 1 << 20;

/// Checks that an incoming disclosure cites the sending area's current
/// signed policy (when a policy key is configured for that peer); fetches
/// the peer's policy when it cites a version not seen with that key (at
/// most once per batch: `memo`).
async fn check_incoming_policy(
    shared: &Shared,
    peer: &proto::AreaId,
    d: &proto::Disclosure,
    memo: &mut PolicyMemo,
) -> Result<(), PolicyCheck> {
    let Some(key) = shared.live().peer(peer).and_then(|p| p.policy_key.clone()) else {
        return Ok(());
    };
    let cited = (d.policy_id.clone(), d.policy_version);
    let current = match (shared.peer_policies.cached(peer, &key), &*memo) {
        (Some(c), _) if c.0 == cited.0 && c.1 >= cited.1 => c,
        (_, Some(known)) => known.clone()?,
        _ => {
            let fetched = match fetch_policy(shared, peer).await {
                Ok(text) => shared
                    .peer_policies
                    .update(peer, &key, &text)
                    .map_err(|e| PolicyCheck::Refused(format!("{peer}'s sharing policy: {e}"))),
                Err(e) => Err(e),
            };
            *memo = Some(fetched.clone());
            fetched?
        }
    };
    if current == cited {
        Ok(())
    } else {
        Err(PolicyCheck::Refused(format!(
            "cites policy {} v{}, but {peer}'s current policy is {} v{}",
            cited.0, cited.1, current.0, current.1
        )))
    }
}

/// A peer's signed policy document, as it serves it (at most
/// [`MAX_POLICY_BYTES`]). Unreachable or failing (5xx) is for now; an
/// answer that it has none (4xx), or one too large, is the peer's word.
async fn fetch_policy(shared: &Shared, peer: &proto::AreaId) -> Result<String, PolicyCheck> {
    let unavailable =
        |e: String| PolicyCheck::Unavailable(format!("cannot fetch {peer}'s sharing policy: {e}"));
    let (client, url) = shared
        .peer_clients
        .get(peer)
        .ok_or_else(|| unavailable("no client for the peer".into()))?;
    let resp = client
        .get(format!("{url}/v1/federation/policy"))
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let status = resp.status();
    // Failing, or a proxy's "later" (408, 429): for now.
    if status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        return Err(unavailable(format!("it answered HTTP {}", status.as_u16())));
    }
    if !status.is_success() {
        return Err(PolicyCheck::Refused(format!(
            "{peer} serves no sharing policy (HTTP {})",
            status.as_u16()
        )));
    }
    let text = crate::federation::read_bounded(resp, MAX_POLICY_BYTES)
        .await
        .map_err(|e| match e {
            crate::federation::ReadError::Transport(e) => unavailable(e),
            e @ crate::federation::ReadError::TooLarge(_) => {
                PolicyCheck::Refused(format!("{peer}'s sharing policy: {e}"))
            }
        })?;
    String::from_utf8(text)
        .map_err(|_| PolicyCheck::Refused(format!("{peer}'s sharing policy is not UTF-8")))
}

/// The caller's directory entry: organisation, role and teams.
async fn me(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
) -> Result<Json<proto::Me>, Failure> {
    let (sender, mb) = user_of(&shared, &peer)?;
    let live = shared.live();
    let user = live
        .directory
        .user(&sender.user)
        .ok_or_else(|| Failure::forbidden("not in the directory"))?;
    Ok(Json(proto::Me {
        identity: peer.identity().uri(),
        organisation: user.organisation.clone(),
        role: user.role.clone(),
        teams: mb.teams,
    }))
}

/// `GET /v1/keypackages`: the caller's stock, so the client tops up when low.
async fn key_package_stock(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<VerifiedPeer>,
) -> Result<Json<proto::KeyPackageStock>, Failure> {
    let (sender, _) = user_of(&shared, &peer)?;
    let stock = shared
        .store
        .put_key_packages(sender.user, Vec::new(), now_ms())
        .await?;
    Ok(Json(stock_of(stock)))
}
