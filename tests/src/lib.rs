//! Test harness: federations of real gateways, in-process on 127.0.0.1, with
//! freshly minted CAs and certificates and real SQLite files in a temporary
//! directory. Used by the integration tests and the bench binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use certs::mint::{Ca, PemPair, Validity};
use certs::Identity;
use client::{Api, ClientConfig};
use gateway::dev::AreaSpec;
use gateway::{Config, Gateway};
use proto::{AreaId, Body, Category, IdempotencyKey, Recipient, SubmitRequest, UserId};

pub use gateway::dev::free_port;

/// Settings for a test federation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TOML appended to every gateway configuration (`[delivery]`, `[limits]`).
    pub toml: String,
    /// Give every area a signed development sharing policy, enforced.
    pub policies: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            toml: "[delivery]\nmessage_validity = \"1h\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n\n\
                   [limits]\nuser_requests_per_second = 100000\nuser_burst = 100000\n\
                   peer_requests_per_second = 100000\npeer_burst = 100000\n"
                .into(),
            policies: false,
        }
    }
}

/// One area of a test federation.
#[derive(Debug)]
pub struct TestArea {
    /// Its id.
    pub area: AreaId,
    /// Its directory.
    pub dir: PathBuf,
    /// Its gateway configuration file.
    pub config_path: PathBuf,
    /// The running gateway, if started.
    pub gateway: Option<Gateway>,
}

/// A federation of in-process gateways.
#[derive(Debug)]
pub struct Federation {
    /// Where everything lives; removed on drop.
    pub dir: tempfile::TempDir,
    /// The areas, in the order given.
    pub areas: Vec<TestArea>,
}

/// An area and its users with their teams.
pub type AreaUsers<'a> = (&'a str, Vec<(&'a str, &'a [&'a str])>);

/// The standard three-area topology: `northshire` (alice, bob), `southvale`
/// (dan, erin, farah in team `duty`; gita) and `eastmoor` (hana).
pub fn standard_areas() -> Vec<AreaUsers<'static>> {
    vec![
        (
            "northshire",
            vec![
                ("alice", &["children-social-care"][..]),
                ("bob", &["exploitation-unit"][..]),
            ],
        ),
        (
            "southvale",
            vec![
                ("dan", &["duty"][..]),
                ("erin", &["duty"][..]),
                ("farah", &["duty"][..]),
                ("gita", &[][..]),
            ],
        ),
        ("eastmoor", vec![("hana", &["duty"][..])]),
    ]
}

impl Federation {
    /// Writes a federation (certificates, configurations) without starting it.
    pub fn create(areas: &[AreaUsers<'_>], settings: &Settings) -> anyhow::Result<Federation> {
        let dir = tempfile::tempdir()?;
        let specs: Vec<AreaSpec> = areas
            .iter()
            .map(|(area, users)| AreaSpec {
                area: (*area).into(),
                port: free_port(),
                users: users
                    .iter()
                    .map(|(u, teams)| {
                        // Exploitation-unit members are police; everyone else social care.
                        let role = if teams.contains(&"exploitation-unit") {
                            "police-officer"
                        } else {
                            "social-worker"
                        };
                        (
                            (*u).into(),
                            format!("{area}-agency"),
                            role.into(),
                            teams.iter().map(|t| (*t).into()).collect(),
                        )
                    })
                    .collect(),
            })
            .collect();
        let fed = gateway::dev::write_federation(
            dir.path(),
            &specs,
            &settings.toml,
            false,
            settings.policies,
        )?;
        let areas = specs
            .iter()
            .zip(fed.gateway_configs)
            .map(|(s, config_path)| {
                Ok(TestArea {
                    area: AreaId::new(s.area.as_str())?,
                    dir: dir.path().join(&s.area),
                    config_path,
                    gateway: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Federation { dir, areas })
    }

    /// Writes and starts the standard three-area federation.
    pub async fn standard() -> anyhow::Result<Federation> {
        Federation::standard_with(&Settings::default()).await
    }

    /// Writes and starts the standard federation with other settings.
    pub async fn standard_with(settings: &Settings) -> anyhow::Result<Federation> {
        let mut fed = Federation::create(&standard_areas(), settings)?;
        fed.start_all().await?;
        Ok(fed)
    }

    /// The index of an area.
    pub fn index(&self, area: &str) -> usize {
        self.areas
            .iter()
            .position(|a| a.area.as_str() == area)
            .unwrap_or(usize::MAX)
    }

    /// The configuration of area `i`, as the gateway would load it.
    pub fn config(&self, i: usize) -> anyhow::Result<Config> {
        Ok(Config::load(&self.areas[i].config_path)?)
    }

    /// Area `i`'s running gateway, if started.
    pub fn gateway(&self, i: usize) -> Option<&Gateway> {
        self.areas.get(i).and_then(|a| a.gateway.as_ref())
    }

    /// Starts area `i`'s gateway (again).
    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.config(i)?;
        // A restarted gateway may find its port in TIME_WAIT briefly; retry the bind.
        let mut tries = 0;
        let gw = loop {
            match Gateway::start(config.clone()).await {
                Ok(g) => break g,
                Err(gateway::GatewayError::Bind { .. }) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.areas[i].gateway = Some(gw);
        Ok(())
    }

    /// Starts every area's gateway.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.areas.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    /// Stops every area's gateway gracefully.
    pub async fn stop_all(&mut self) {
        for i in 0..self.areas.len() {
            self.stop(i).await;
        }
    }

    /// Stops area `i`'s gateway gracefully.
    pub async fn stop(&mut self, i: usize) {
        if let Some(g) = self.areas[i].gateway.take() {
            g.shutdown().await;
        }
    }

    /// The client configuration file of `user` in area `i`.
    pub fn client_config_path(&self, i: usize, user: &str) -> PathBuf {
        self.areas[i].dir.join("users").join(format!("{user}.toml"))
    }

    /// An API client for `user` of area `i`.
    pub fn api(&self, i: usize, user: &str) -> anyhow::Result<Api> {
        let config = ClientConfig::load(&self.client_config_path(i, user))?;
        Ok(Api::new(&config)?)
    }

    /// A TLS connection to area `i`'s gateway as `user` (handshake done,
    /// nothing sent), for tests that write HTTP by hand.
    pub async fn tls_connect(
        &self,
        i: usize,
        user: &str,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = ClientConfig::load(&self.client_config_path(i, user))?;
        let creds = certs::Credentials::load(&config.cert, &config.key)?;
        let tls = certs::user_client_config(&creds, &config.area, &self.ca_certs(i)?)?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port(i)?)).await?;
        let name =
            certs::rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        Ok(connector.connect(name, tcp).await?)
    }

    /// Area `i`'s CA, to mint more certificates.
    pub fn ca(&self, i: usize) -> anyhow::Result<Ca> {
        let dir = self.areas[i].dir.join("ca");
        let pem = PemPair {
            cert: std::fs::read_to_string(dir.join("ca.crt"))?,
            key: std::fs::read_to_string(dir.join("ca.key"))?,
        };
        Ok(Ca::from_pem(pem)?)
    }

    /// Area `i`'s CA certificates.
    pub fn ca_certs(
        &self,
        i: usize,
    ) -> anyhow::Result<Vec<certs::rustls::pki_types::CertificateDer<'static>>> {
        Ok(certs::load_certs(
            &self.areas[i].dir.join("ca").join("ca.crt"),
        )?)
    }

    /// An API client for area `i`'s gateway presenting an arbitrary certificate.
    pub fn api_with(&self, i: usize, pair: &PemPair) -> anyhow::Result<Api> {
        let url = format!("https://127.0.0.1:{}", self.port(i)?);
        Ok(Api::from_parts(
            &url,
            &pair.credentials()?,
            &self.areas[i].area,
            &self.ca_certs(i)?,
        )?)
    }

    /// The port of area `i`'s gateway.
    pub fn port(&self, i: usize) -> anyhow::Result<u16> {
        Ok(self.config(i)?.listen.port())
    }

    /// Mints a certificate for `identity` from area `ca_of`'s CA.
    pub fn mint(
        &self,
        ca_of: usize,
        identity: &Identity,
        validity: Validity,
    ) -> anyhow::Result<PemPair> {
        Ok(self.ca(ca_of)?.issue(identity, validity)?)
    }

    /// The path of area `i`'s database.
    pub fn db_path(&self, i: usize) -> PathBuf {
        self.areas[i].dir.join("data").join("gateway.sqlite3")
    }

    /// Edits area `i`'s configuration file: `replace` becomes `with`, once.
    pub fn edit_config(&self, i: usize, replace: &str, with: &str) -> anyhow::Result<()> {
        let path = &self.areas[i].config_path;
        let text = std::fs::read_to_string(path)?;
        anyhow::ensure!(
            text.contains(replace),
            "{replace:?} is not in {}",
            path.display()
        );
        std::fs::write(path, text.replacen(replace, with, 1))?;
        Ok(())
    }

    /// A listener on area `i`'s gateway address (stopped first), for a
    /// stand-in ([`serve_as_gateway`]); retried while the port is in
    /// TIME_WAIT.
    pub async fn listen_as(&self, i: usize) -> anyhow::Result<tokio::net::TcpListener> {
        let addr = self.config(i)?.listen;
        let mut tries = 0;
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => return Ok(l),
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("binding {addr}: {e}"),
            }
        }
    }

    /// Area `peer`'s `[[peers]]` entry in the other areas' configurations
    /// (as written without sharing policies).
    pub fn peer_entry(&self, peer: usize) -> anyhow::Result<String> {
        let area = &self.areas[peer].area;
        let port = self.port(peer)?;
        Ok(format!(
            "\n[[peers]]\narea = \"{area}\"\nurl = \"https://127.0.0.1:{port}\"\nca = \"../{area}/ca/ca.crt\"\n"
        ))
    }

    /// Gives area `i`'s gateway a metrics listener on a free port (before
    /// it starts).
    pub fn serve_metrics(&self, i: usize) -> anyhow::Result<()> {
        self.edit_config(
            i,
            "data_dir = \"data\"\n",
            "data_dir = \"data\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        )
    }

    /// Area `i`'s `/metrics` text, over plain HTTP as Prometheus reads it.
    pub async fn metrics_text(&self, i: usize) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = self
            .gateway(i)
            .and_then(Gateway::metrics_addr)
            .context("the gateway is not running with a metrics listener")?;
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// Runs a counting query against area `i`'s database (read-only).
    pub fn count(&self, i: usize, sql: &str) -> anyhow::Result<i64> {
        count_rows(&self.db_path(i), sql)
    }
}

/// Runs a `SELECT COUNT(*) ...` against a database file, read-only.
pub fn count_rows(db: &Path, sql: &str) -> anyhow::Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", db.display()))?;
    Ok(conn.query_row(sql, [], |r| r.get(0))?)
}

/// A submission with the given key and body.
pub fn message(to: &str, key: &str, body: Vec<u8>) -> anyhow::Result<SubmitRequest> {
    Ok(SubmitRequest {
        idempotency_key: IdempotencyKey::new(key)?,
        recipient: to.parse::<Recipient>()?,
        category: Category::new("relocation")?,
        urgent: false,
        kind: proto::MessageKind::Opaque,
        disclosure: None,
        commit_proof: None,
        body: Body(body),
    })
}

/// Why message `id` came back to its sender, if it is `undeliverable`.
pub async fn undeliverable_reason(api: &Api, id: &proto::MessageId) -> Option<String> {
    let st = api.status(id).await.ok()?;
    if st.status != proto::Status::Undeliverable {
        return None;
    }
    st.history.last().and_then(|h| h.reason.clone())
}

/// Whether the sender sees message `id` reach `status` within `limit`.
pub async fn reaches(
    api: &Api,
    id: &proto::MessageId,
    status: proto::Status,
    limit: Duration,
) -> bool {
    eventually(limit, || async {
        api.status(id)
            .await
            .map(|s| s.status == status)
            .unwrap_or(false)
    })
    .await
}

/// Polls `f` every 50 ms until it returns true or `limit` passes.
/// The limit bounds a hung test; it is not a performance assertion.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shorthand for a user id in tests.
pub fn user(id: &str) -> UserId {
    UserId::new(id).unwrap_or_else(|e| panic!("bad test user id {id}: {e}"))
}

/// A stand-in for area `i`'s gateway: serves `handle` on `listener` over
/// real mTLS, with that gateway's certificate and trust (its own users and
/// its peers), so that clients and peers connect to it as to the gateway.
/// For tests of what others do when a gateway misbehaves or is older, and
/// for the bench's echo baseline.
pub fn serve_as_gateway<F, Fut>(
    fed: &Federation,
    i: usize,
    listener: tokio::net::TcpListener,
    handle: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    let config = fed.config(i)?;
    let own = certs::Credentials::load(&config.tls.cert, &config.tls.key)?;
    let mut peers = Vec::new();
    for p in &config.peers {
        peers.push(certs::PeerTrust {
            area: p.area.clone(),
            cas: certs::load_certs(&p.ca)?,
        });
    }
    let trust = certs::ServerTrust {
        own_area: config.area.clone(),
        own_cas: certs::load_certs(&config.tls.ca)?,
        peers,
        revocations: certs::Revocations::default(),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(certs::server_config(&own, &trust)?);
    Ok(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let (acceptor, handle) = (acceptor.clone(), handle.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    }))
}

/// A request's whole body (empty if it could not be read).
pub async fn body_bytes(req: hyper::Request<hyper::body::Incoming>) -> bytes::Bytes {
    use http_body_util::BodyExt as _;
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// An MLS Commit's public framing, made up: `group` (bytes) at `epoch`,
/// with bytes where the encrypted parts go. A delivery service that cannot
/// decrypt takes it for any member's Commit.
pub fn made_up_commit(group: &[u8], epoch: u64) -> Vec<u8> {
    let mut m = vec![0, 1, 0, 2]; // mls10, private_message
    let opaque = |m: &mut Vec<u8>, bytes: &[u8]| {
        assert!(bytes.len() < 64);
        m.push(bytes.len() as u8);
        m.extend_from_slice(bytes);
    };
    opaque(&mut m, group);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.push(3); // commit
    opaque(&mut m, b"");
    opaque(&mut m, &[7; 16]);
    opaque(&mut m, &[9; 48]);
    m
}
