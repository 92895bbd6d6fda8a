//! The client side of the referral gateway: configuration and a typed API
//! client that talks to the user's home gateway over mutual TLS.
//!
//! The CLI (`client` binary) is a thin layer over [`Api`]. Promises:
//! * the client trusts only its own area's CA and only the identity
//!   `spiffe://<area>/gateway` for its gateway;
//! * a submission may be retried freely: it carries an idempotency key, and
//!   [`Api::submit`] retries transient failures with the same key;
//! * errors are typed: configuration, transport (cannot reach or trust the
//!   gateway), or a refusal by the gateway with its error code.

pub mod cases;
pub mod lint;
pub mod mls;
pub mod referral;
pub mod sent;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proto::{
    ApiError, AreaId, ErrorCode, FetchResponse, InboxResponse, MessageId, Status, StatusResponse,
    SubmitRequest, SubmitResponse,
};
use serde::Deserialize;

/// A fresh idempotency key for a new submission: time-ordered, so the
/// gateways' idempotency indexes grow at one end
/// ([`proto::IdempotencyKey::time_ordered`]).
pub fn fresh_idempotency_key() -> proto::IdempotencyKey {
    proto::IdempotencyKey::time_ordered(now_ms(), rand::random())
}

/// Creates `dir` (and its parents) if needed, owner-only (mode 0700 on
/// Unix): the client's data directory holds MLS private keys and decrypted
/// case history. An existing directory is left as it is; the files in it
/// are made owner-only ([`private_file`], [`make_private`]).
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Makes `path`, if it exists, readable and writable by its owner only
/// (files written by an earlier version were not).
pub fn make_private(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Options that create a file only its owner may read or write (mode 0600
/// on Unix).
pub fn private_file() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration file is unreadable or invalid.
    #[error("configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A certificate or key is unusable.
    #[error("certificates: {0}")]
    Certs(#[from] certs::CertError),
    /// The gateway could not be reached or trusted (connection, TLS).
    #[error("cannot reach the gateway: {0}")]
    Transport(String),
    /// The gateway refused the request.
    #[error("gateway refused ({status}, {code:?}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Machine-readable code.
        code: ErrorCode,
        /// For people.
        message: String,
        /// Seconds to wait before retrying, if the gateway said.
        retry_after: Option<u64>,
    },
    /// The gateway's answer could not be understood.
    #[error("unexpected answer from the gateway: {0}")]
    Decode(String),
    /// The gateway refused this client's certificate because the area's CA
    /// revoked it (in the handshake, or `certificate_revoked` on a
    /// connection opened before): retrying will not help.
    #[error("the gateway refused your certificate because it has been revoked; ask your area's gateway administrator for a new one ({0})")]
    Revoked(String),
    /// The gateway's own certificate is revoked by the home area's CA (per
    /// the configured `crls`): it may not be the area's gateway at all.
    /// Nothing was sent.
    #[error("refused to talk to the gateway: your area's CA has revoked its certificate, so it may not be your area's gateway; nothing was sent. Tell your area's gateway administrator ({0})")]
    GatewayRevoked(String),
}

impl ClientError {
    /// The gateway's error code, if the gateway refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A client configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The home gateway's base URL, e.g. `https://127.0.0.1:7441`.
    pub gateway: String,
    /// The home area.
    pub area: AreaId,
    /// The user's certificate (PEM).
    pub cert: PathBuf,
    /// The user's private key (PEM).
    pub key: PathBuf,
    /// The home area's CA certificate (PEM).
    pub ca: PathBuf,
    /// The home area's sharing-policy verification key (`ed25519:<base64>`):
    /// the client verifies the policy its gateway serves before applying it.
    #[serde(default)]
    pub policy_key: Option<String>,
    /// Where the client keeps its MLS keys, groups and case history.
    /// Default: `<config file stem>.data` beside the configuration file.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// The home area's CA's certificate revocation lists (PEM or DER), as
    /// its administrator publishes them: a gateway certificate they revoke
    /// (its key stolen, say) is refused. Each must be signed by the CA in
    /// `ca`. Default: none.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

impl ClientConfig {
    /// Where the client keeps its state: `data_dir`, which
    /// [`ClientConfig::load`] always sets (`client.data` otherwise).
    pub fn data_directory(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("client.data"))
    }

    /// Reads a configuration file; relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<ClientConfig, ClientError> {
        let err = |message: String| ClientError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut c: ClientConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.cert, &mut c.key, &mut c.ca]
            .into_iter()
            .chain(c.crls.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "client".into());
        let data = c
            .data_dir
            .take()
            .unwrap_or_else(|| PathBuf::from(format!("{stem}.data")));
        c.data_dir = Some(if data.is_relative() {
            base.join(data)
        } else {
            data
        });
        if !c.gateway.starts_with("https://") {
            return Err(err("gateway: must start with https://".into()));
        }
        Ok(c)
    }
}

/// How long [`Api::submit`] tries again, by default, while the gateway is
/// out of reach or busy: about a minute.
pub const SUBMIT_RETRY_FOR: Duration = Duration::from_secs(60);

/// A connection to the home gateway.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    /// `{base}/v1/messages`, parsed once: submitting is the hot path.
    messages: reqwest::Url,
    /// The TLS configuration, for hearing why a handshake was refused
    /// ([`Api::refusal`]).
    tls: Arc<certs::rustls::ClientConfig>,
    /// How long [`Api::submit`] tries again while the gateway is out of
    /// reach or busy.
    retry_for: Duration,
}

fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// `e` and its causes, those inside an `io::Error` included (its `source`
/// skips the error it wraps, where the TLS layer's error sits).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut all = Vec::new();
    let mut next = vec![e];
    while let Some(c) = next.pop() {
        all.push(c);
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            next.push(inner);
        }
        if let Some(s) = c.source() {
            next.push(s);
        }
    }
    all
}

/// Whether a TLS error that `is` somewhere in `e`'s causes.
fn tls_error_in(
    e: &(dyn std::error::Error + 'static),
    is: fn(&certs::rustls::Error) -> bool,
) -> bool {
    causes(e)
        .into_iter()
        .any(|c| c.downcast_ref::<certs::rustls::Error>().is_some_and(is))
}

/// Whether the TLS layer, somewhere in `e`'s causes, received the alert
/// `certificate_revoked`.
fn revoked_alert(e: &(dyn std::error::Error + 'static)) -> bool {
    tls_error_in(e, |t| {
        matches!(
            t,
            certs::rustls::Error::AlertReceived(
                certs::rustls::AlertDescription::CertificateRevoked
            )
        )
    })
}

/// Whether an I/O error of `kind` is somewhere in `e`'s causes.
fn io_kind_in(e: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    causes(e).into_iter().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
    })
}

/// A failed exchange with the gateway: a revoked certificate (the TLS alert
/// says so) is told apart from a gateway that cannot be reached.
fn transport(e: &reqwest::Error) -> ClientError {
    if revoked_alert(e) {
        ClientError::Revoked(describe(e))
    } else if gateway_revoked(e) {
        ClientError::GatewayRevoked(describe(e))
    } else {
        ClientError::Transport(describe(e))
    }
}

/// Whether this client refused the gateway's certificate as revoked (by
/// the lists in its configuration).
fn gateway_revoked(e: &(dyn std::error::Error + 'static)) -> bool {
    tls_error_in(e, |t| {
        matches!(
            t,
            certs::rustls::Error::InvalidCertificate(certs::rustls::CertificateError::Revoked)
        )
    })
}

/// Another worker's text made safe for a terminal: invalid UTF-8 becomes
/// U+FFFD, and control characters other than newline and tab are shown as
/// escapes (`\u{1b}`), so that a message cannot move the cursor, rewrite
/// lines already printed (a forged `REFUSED` or `joined` line) or send the
/// terminal commands.
pub fn for_terminal(bytes: &[u8]) -> String {
    escaped(bytes, true)
}

/// A gateway's or peer's short text (a refusal reason, an identity, a
/// case id) made safe for one line of a terminal: as [`for_terminal`],
/// newlines and tabs escaped too, so it cannot start a line that looks
/// like the client's own, and so are the bidirectional-text controls
/// ([`is_bidi_control`]), so it cannot show its characters in another
/// order than they are (a case id or a sender that reads as another).
pub fn one_line(text: &str) -> String {
    escaped(text.as_bytes(), false)
}

/// Whether `c` is a bidirectional-text control (an embedding, override or
/// isolate, or a direction mark): it changes the order in which the text
/// after it is shown.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A case message for a person to read: a structured case file one field
/// per line, free text as it is; both safe for a terminal
/// ([`for_terminal`]).
pub fn readable(plaintext: &[u8]) -> String {
    match referral::Disclosed::from_bytes(plaintext) {
        Ok(d) => for_terminal(d.render().as_bytes()),
        Err(_) => for_terminal(plaintext),
    }
}

fn escaped(bytes: &[u8], keep_lines: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // A message's own text keeps its direction marks (names and
        // places in right-to-left scripts); one line does not.
        let bidi = !keep_lines && is_bidi_control(c);
        if bidi || c.is_control() && !(keep_lines && (c == '\n' || c == '\t')) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A time (milliseconds since the Unix epoch) as RFC 3339 UTC, to the
/// second or, with `millis`, the millisecond. Times come from gateways and
/// other workers' messages: one past the year 9999, which RFC 3339 cannot
/// write, is shown as its number instead of failing.
pub fn time_text(at_ms: u64, millis: bool) -> String {
    /// 10000-01-01T00:00:00Z.
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if at_ms >= YEAR_10000_MS {
        return format!("{at_ms} ms after 1970");
    }
    let at = std::time::UNIX_EPOCH + Duration::from_millis(at_ms);
    if millis {
        humantime::format_rfc3339_millis(at).to_string()
    } else {
        humantime::format_rfc3339_seconds(at).to_string()
    }
}

/// What to tell the sender when the recipient's gateway keeps failing: the
/// message is queued and retried, and an urgent one may need a phone call.
/// The gateway's words for the failure are escaped ([`one_line`]).
pub fn waiting_note(area: &AreaId, w: &proto::Waiting) -> String {
    format!(
        "{area}'s gateway has not taken messages since {} ({}); this one is queued \
         and will be retried until it expires: if it is urgent, phone them",
        time_text(w.since_ms, false),
        one_line(&w.last_error)
    )
}

/// How long before the user's certificate expires the client warns.
pub const CERT_WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);

/// Refuses a user certificate past its `notAfter` at `now` (the gateway
/// would refuse the handshake with a less helpful message), and warns when
/// it expires within [`CERT_WARN_BEFORE`]. Returns the days left.
pub fn check_expiry(
    file: &std::path::Path,
    creds: &certs::Credentials,
    now: SystemTime,
) -> Result<i64, ClientError> {
    let Some(leaf) = creds.chain.first() else {
        return Err(certs::CertError::NoCertificate {
            what: file.display().to_string(),
        }
        .into());
    };
    let not_after = certs::not_after(leaf)?;
    let now_s = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = || {
        time_text(
            u64::try_from(not_after).unwrap_or(0).saturating_mul(1000),
            false,
        )
    };
    let days_left = (not_after - now_s).div_euclid(86_400);
    if not_after <= now_s {
        return Err(certs::CertError::Expired {
            what: format!(
                "your certificate {} (ask your area's gateway administrator for a new one)",
                file.display()
            ),
            at: at(),
        }
        .into());
    }
    if not_after - now_s <= CERT_WARN_BEFORE.as_secs() as i64 {
        tracing::warn!(
            file = %file.display(),
            expires = %at(),
            days_left,
            "your certificate expires soon: ask your area's gateway administrator for a new one"
        );
    }
    Ok(days_left)
}

impl Api {
    /// Builds a client from a configuration.
    pub fn new(config: &ClientConfig) -> Result<Api, ClientError> {
        let creds = certs::Credentials::load(&config.cert, &config.key)?;
        check_expiry(&config.cert, &creds, SystemTime::now())?;
        let cas = certs::load_certs(&config.ca)?;
        let revocations = if config.crls.is_empty() {
            None
        } else {
            let list = certs::RevocationList::load([(
                &config.area,
                config.crls.as_slice(),
                cas.as_slice(),
            )])?;
            Some(certs::Revocations::new(list))
        };
        Api::build(&config.gateway, &creds, &config.area, &cas, revocations)
    }

    /// Builds a client from credentials in memory.
    pub fn from_parts(
        gateway: &str,
        creds: &certs::Credentials,
        area: &AreaId,
        cas: &[certs::rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Api, ClientError> {
        Api::build(gateway, creds, area, cas, None)
    }

    fn build(
        gateway: &str,
        creds: &certs::Credentials,
        area: &AreaId,
        cas: &[certs::rustls::pki_types::CertificateDer<'static>],
        revocations: Option<certs::Revocations>,
    ) -> Result<Api, ClientError> {
        let tls = Arc::new(match &revocations {
            Some(r) => certs::user_client_config_checking(creds, area, cas, r)?,
            None => certs::user_client_config(creds, area, cas)?,
        });
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            // Below a gateway's default `limits.idle_timeout` (60 s), so
            // that a connection is retired here before the gateway closes it.
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| transport(&e))?;
        let base = gateway.trim_end_matches('/').to_owned();
        let messages = reqwest::Url::parse(&format!("{base}/v1/messages"))
            .map_err(|e| ClientError::Transport(format!("gateway URL {gateway:?}: {e}")))?;
        Ok(Api {
            http,
            base,
            messages,
            tls,
            retry_for: SUBMIT_RETRY_FOR,
        })
    }

    /// This API, with [`Api::submit`] trying again for `retry_for` (by
    /// default [`SUBMIT_RETRY_FOR`]) while the gateway is out of reach or
    /// busy.
    #[must_use]
    pub fn retrying_for(mut self, retry_for: Duration) -> Api {
        self.retry_for = retry_for;
        self
    }

    /// Sends a request. A failure that may have hidden the gateway's reason
    /// (see [`Api::refusal`]) is looked into before it is reported.
    async fn sent(
        &self,
        request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, ClientError> {
        let e = match request.await {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        if revoked_alert(&e)
            || gateway_revoked(&e)
            || e.is_timeout()
            || !(e.is_connect() || e.is_request())
            || io_kind_in(&e, std::io::ErrorKind::ConnectionRefused)
        {
            return Err(transport(&e));
        }
        match self.refusal().await {
            Some(certs::rustls::Error::AlertReceived(
                certs::rustls::AlertDescription::CertificateRevoked,
            )) => Err(ClientError::Revoked(format!(
                "{}; the gateway's TLS alert: certificate_revoked",
                describe(&e)
            ))),
            Some(alert) => Err(ClientError::Transport(format!(
                "{}; the gateway refused this certificate in the TLS handshake: {alert}",
                describe(&e)
            ))),
            None => Err(transport(&e)),
        }
    }

    /// Why the gateway refuses this client's handshake, if it does.
    ///
    /// In TLS 1.3 the client's side of the handshake ends before the gateway
    /// has judged the client's certificate; the gateway's verdict, when it is
    /// a refusal, is an alert that follows. The HTTP client may find the
    /// connection closed before it reads that alert, and then reports only
    /// "connection closed". So one connection of our own is opened, with a
    /// request written after the handshake, and read until the gateway
    /// answers: an alert is the reason; an HTTP answer means the handshake
    /// was accepted, and the failure was something else.
    async fn refusal(&self) -> Option<certs::rustls::Error> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let host = self
            .messages
            .host_str()?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = self.messages.port_or_known_default()?;
        let name = certs::rustls::pki_types::ServerName::try_from(host.clone()).ok()?;
        // The gateway's alert only: an error of our own (its certificate
        // refused by us) is not the gateway's reason.
        let tls_error = |e: &std::io::Error| match e.get_ref()?.downcast_ref() {
            Some(alert @ certs::rustls::Error::AlertReceived(_)) => Some(alert.clone()),
            _ => None,
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            let mut tls = match connector.connect(name, tcp).await {
                Ok(tls) => tls,
                Err(e) => return tls_error(&e),
            };
            let request = b"GET /v1/health HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n";
            if let Err(e) = tls.write_all(request).await {
                return tls_error(&e);
            }
            let mut first = [0u8; 1];
            match tls.read(&mut first).await {
                Ok(_) => None,
                Err(e) => tls_error(&e),
            }
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .ok()
            .flatten()
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return resp
                .json()
                .await
                .map_err(|e| ClientError::Decode(describe(&e)));
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = resp.text().await.map_err(|e| transport(&e))?;
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => Err(ClientError::Api {
                status: status.as_u16(),
                code: e.error,
                message: e.message,
                retry_after,
            }),
            Err(_) => Err(ClientError::Decode(format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ))),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let request = self.http.get(format!("{}{path}", self.base)).send();
        let resp = self.sent(request).await?;
        Self::answer(resp).await
    }

    /// Sends raw bytes as a submission body. For tests of malformed input.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        self.post_typed(path, "application/json", body).await
    }

    /// POSTs bytes in the framed encoding ([`proto::frame`]) to `path` and
    /// returns the JSON answer (for tests and tools).
    pub async fn post_framed(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        self.post_typed(path, proto::frame::FRAMED, body).await
    }

    async fn post_typed(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send();
        let resp = self.sent(request).await?;
        Self::answer(resp).await
    }

    /// Submits a message once, without retrying. The request is framed
    /// ([`proto::frame`]): the body travels raw, not in base64.
    pub async fn submit_once(&self, req: &SubmitRequest) -> Result<SubmitResponse, ClientError> {
        let request = self
            .http
            .post(self.messages.clone())
            .header(reqwest::header::CONTENT_TYPE, proto::frame::FRAMED)
            .body(proto::frame::encode_submit(req))
            .send();
        let resp = self.sent(request).await?;
        Self::answer(resp).await
    }

    /// Submits a message, retrying (with the same idempotency key) when the
    /// gateway is briefly unreachable, overloaded or rate-limiting, for up to
    /// about a minute.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse, ClientError> {
        let mut delay = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + self.retry_for;
        loop {
            let err = match self.submit_once(req).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let wait = match &err {
                ClientError::Api {
                    code: ErrorCode::RateLimited,
                    retry_after,
                    ..
                } => Duration::from_secs(retry_after.unwrap_or(1).min(3600)),
                ClientError::Api {
                    code: ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RequestTimeout,
                    ..
                }
                | ClientError::Transport(_) => delay,
                _ => return Err(err),
            };
            if tokio::time::Instant::now()
                .checked_add(wait)
                .is_none_or(|t| t > deadline)
            {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Lists the inbox; when it is empty, waits up to `wait` for a message.
    pub async fn inbox(&self, wait: Duration) -> Result<InboxResponse, ClientError> {
        self.get(&format!("/v1/inbox?wait={}", wait.as_secs()))
            .await
    }

    /// Fetches one message (marks it fetched).
    pub async fn fetch(&self, id: &MessageId) -> Result<FetchResponse, ClientError> {
        self.get(&format!("/v1/messages/{id}")).await
    }

    /// Acknowledges a message.
    pub async fn ack(&self, id: &MessageId) -> Result<Status, ClientError> {
        let v: serde_json::Value = self
            .post_raw(&format!("/v1/messages/{id}/ack"), Vec::new())
            .await?;
        serde_json::from_value(v.get("status").cloned().unwrap_or_default())
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Says that a message to one's team is in a case one is not part of
    /// (it cannot be decrypted here): the team's inbox stops waiting for
    /// us, and its sender is not told it was acknowledged (only that it is
    /// undeliverable, if no one else is left to read it). Returns its
    /// status.
    pub async fn not_in_case(&self, id: &MessageId) -> Result<Status, ClientError> {
        let body = serde_json::to_vec(&proto::AckRequest { not_in_case: true })
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let v: serde_json::Value = self
            .post_raw(&format!("/v1/messages/{id}/ack"), body)
            .await?;
        serde_json::from_value(v.get("status").cloned().unwrap_or_default())
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A sent message's status and history.
    pub async fn status(&self, id: &MessageId) -> Result<StatusResponse, ClientError> {
        self.get(&format!("/v1/messages/{id}/status")).await
    }

    /// Publishes MLS KeyPackages (TLS-encoded); returns the stock left.
    pub async fn upload_key_packages(
        &self,
        kps: Vec<Vec<u8>>,
    ) -> Result<proto::KeyPackageStock, ClientError> {
        let body = serde_json::to_vec(&proto::KeyPackageUpload {
            key_packages: kps.into_iter().map(proto::Body).collect(),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        let v = self.post_raw("/v1/keypackages", body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The caller's KeyPackage stock at the gateway.
    pub async fn key_package_stock(&self) -> Result<proto::KeyPackageStock, ClientError> {
        self.get("/v1/keypackages").await
    }

    /// Binds an epoch of a group whose home is this gateway to a Commit, with
    /// its proof, without sending the Commit to anyone: a group's maker does
    /// so for the Commit that made it (see [`proto::CommitProof`]).
    pub async fn order_commit(
        &self,
        order: &proto::CommitOrder,
    ) -> Result<proto::CommitOrdered, ClientError> {
        let body = serde_json::to_vec(order).map_err(|e| ClientError::Decode(e.to_string()))?;
        let v = self.post_raw("/v1/commits", body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Claims one KeyPackage for each member of a user or team, here or in a peer area.
    pub async fn claim(
        &self,
        recipient: &proto::Recipient,
    ) -> Result<proto::ClaimResponse, ClientError> {
        let body = serde_json::to_vec(&proto::ClaimRequest {
            recipient: recipient.clone(),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        let v = self.post_raw("/v1/keypackages/claim", body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The home area's signed sharing policy document, if it publishes one.
    pub async fn policy_text(&self) -> Result<Option<String>, ClientError> {
        let request = self.http.get(format!("{}/v1/policy", self.base)).send();
        let resp = self.sent(request).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Self::answer::<serde_json::Value>(resp).await.map(|_| None);
        }
        resp.text().await.map(Some).map_err(|e| transport(&e))
    }

    /// The caller's directory entry (organisation, role, teams).
    pub async fn me(&self) -> Result<proto::Me, ClientError> {
        self.get("/v1/me").await
    }

    /// Checks that the gateway answers and who it thinks we are.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/health").await
    }
}

#[cfg(test)]
mod tests;
