//! The development federation: three areas on loopback with freshly minted
//! CAs and certificates, a few users each, and a client configuration per user.
//!
//! Everything is written under one directory; running it again reuses what
//! is there, so the demo's messages survive a restart.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use certs::mint::{Ca, PemPair, Validity};
use certs::Identity;
use proto::{AreaId, UserId};

/// Why the development federation could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Minting failed.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// A built-in name is invalid (a bug).
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
}

/// A user of the demo: (id, organisation, role, teams).
type DemoUser = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// The demo areas and their directories.
const AREAS: &[(&str, &[DemoUser])] = &[
    (
        "northshire",
        &[
            (
                "alice",
                "northshire-childrens-services",
                "social-worker",
                &["children-social-care"],
            ),
            (
                "bob",
                "northshire-police",
                "police-officer",
                &["exploitation-unit"],
            ),
            (
                "carol",
                "northshire-health",
                "school-nurse",
                &["health-safeguarding"],
            ),
        ],
    ),
    (
        "southvale",
        &[
            (
                "dan",
                "southvale-childrens-services",
                "duty-social-worker",
                &["duty"],
            ),
            (
                "erin",
                "southvale-childrens-services",
                "duty-social-worker",
                &["duty"],
            ),
            (
                "farah",
                "southvale-childrens-services",
                "team-manager",
                &["duty"],
            ),
            (
                "gita",
                "southvale-police",
                "police-officer",
                &["exploitation-unit"],
            ),
        ],
    ),
    (
        "eastmoor",
        &[
            (
                "hana",
                "eastmoor-childrens-services",
                "social-worker",
                &["duty"],
            ),
            (
                "ivan",
                "eastmoor-police",
                "police-officer",
                &["exploitation-unit"],
            ),
        ],
    ),
];

/// One area of a generated federation.
#[derive(Debug, Clone)]
pub struct AreaSpec {
    /// The area id.
    pub area: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its directory: (id, organisation, role, teams).
    pub users: Vec<(String, String, String, Vec<String>)>,
}

/// The demo's areas, on ports `base_port`, `base_port + 1`, ... or, when
/// `base_port` is 0, on free ports chosen now.
pub fn demo_areas(base_port: u16) -> Vec<AreaSpec> {
    AREAS
        .iter()
        .enumerate()
        .map(|(i, (area, users))| AreaSpec {
            area: (*area).to_owned(),
            port: if base_port == 0 {
                free_port()
            } else {
                base_port.saturating_add(i as u16)
            },
            users: users
                .iter()
                .map(|(u, o, r, t)| {
                    (
                        (*u).into(),
                        (*o).into(),
                        (*r).into(),
                        t.iter().map(|t| (*t).into()).collect(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// The `[delivery]` section the demo uses.
pub const DEMO_SETTINGS: &str =
    "[delivery]\nmessage_validity = \"5d\"\nretry_initial = \"250ms\"\nretry_max = \"10s\"\n";

/// What [`init`] produced.
#[derive(Debug, Clone)]
pub struct DevFederation {
    /// One gateway configuration file per area.
    pub gateway_configs: Vec<PathBuf>,
    /// `(area, user, client config file)` for every demo user.
    pub clients: Vec<(AreaId, UserId, PathBuf)>,
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), DevError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

fn write_pair(dir: &Path, name: &str, pair: &PemPair) -> Result<(), DevError> {
    write(&dir.join(format!("{name}.crt")), &pair.cert, false)?;
    write(&dir.join(format!("{name}.key")), &pair.key, true)
}

/// A free TCP port on 127.0.0.1 (bound, then released), or 0 if none.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Writes (or reuses) the development federation under `dir`, with gateways
/// listening on `127.0.0.1:<base_port + i>` and metrics on `<base_port + 100 + i>`
/// (with `base_port` 0: free ports, no metrics).
pub fn init(dir: &Path, base_port: u16) -> Result<DevFederation, DevError> {
    write_federation(dir, &demo_areas(base_port), DEMO_SETTINGS, base_port != 0)
}

/// Writes a federation of `areas` under `dir`: per area a CA
/// (`<area>/ca/ca.{crt,key}`), a gateway certificate and configuration
/// (`<area>/gateway.toml`, with `settings` appended), every other area as a
/// peer, and per user a certificate and client configuration
/// (`<area>/users/<user>.{crt,key,toml}`). An area whose configuration
/// exists already is reused as it is.
pub fn write_federation(
    dir: &Path,
    areas: &[AreaSpec],
    settings: &str,
    metrics: bool,
) -> Result<DevFederation, DevError> {
    let mut out = DevFederation {
        gateway_configs: Vec::new(),
        clients: Vec::new(),
    };
    let year = Validity::For(std::time::Duration::from_secs(365 * 86_400));
    for spec in areas {
        let area = &spec.area;
        let area_id = AreaId::new(area.as_str())?;
        let adir = dir.join(area);
        let config_path = adir.join("gateway.toml");
        if !config_path.exists() {
            let ca = Ca::new(&area_id)?;
            write_pair(&adir.join("ca"), "ca", ca.pem())?;
            write_pair(
                &adir,
                "gateway",
                &ca.issue(&Identity::Gateway(area_id.clone()), year)?,
            )?;
            let mut toml = format!(
                "# Gateway of the area {area}. Generated by `gateway dev`.\n\
                 area = \"{area}\"\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data\"\n",
                spec.port
            );
            if metrics {
                let _ = writeln!(
                    toml,
                    "metrics_listen = \"127.0.0.1:{}\"",
                    spec.port.saturating_add(100)
                );
            }
            let _ = write!(toml, "\n[tls]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\nca = \"ca/ca.crt\"\n\n{settings}");
            for peer in areas.iter().filter(|p| p.area != spec.area) {
                let _ = write!(
                    toml,
                    "\n[[peers]]\narea = \"{}\"\nurl = \"https://127.0.0.1:{}\"\nca = \"../{}/ca/ca.crt\"\n",
                    peer.area, peer.port, peer.area
                );
            }
            for (user, org, role, teams) in &spec.users {
                let teams: Vec<String> = teams.iter().map(|t| format!("\"{t}\"")).collect();
                let _ = write!(
                    toml,
                    "\n[[users]]\nid = \"{user}\"\norganisation = \"{org}\"\nrole = \"{role}\"\nteams = [{}]\n",
                    teams.join(", ")
                );
                let uid = UserId::new(user.as_str())?;
                let udir = adir.join("users");
                write_pair(
                    &udir,
                    user,
                    &ca.issue(&Identity::User(area_id.clone(), uid), year)?,
                )?;
                write(
                    &udir.join(format!("{user}.toml")),
                    &format!(
                        "# Client configuration of {user} in {area}. Generated by `gateway dev`.\n\
                         gateway = \"https://127.0.0.1:{}\"\narea = \"{area}\"\n\
                         cert = \"{user}.crt\"\nkey = \"{user}.key\"\nca = \"../ca/ca.crt\"\n",
                        spec.port
                    ),
                    false,
                )?;
            }
            write(&config_path, &toml, false)?;
        }
        out.gateway_configs.push(config_path);
        for (user, ..) in &spec.users {
            out.clients.push((
                area_id.clone(),
                UserId::new(user.as_str())?,
                adir.join("users").join(format!("{user}.toml")),
            ));
        }
    }
    Ok(out)
}
