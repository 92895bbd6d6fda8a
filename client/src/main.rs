//! The `client` binary: a worker's command line for sending referrals,
//! reading the inbox and following a message's status.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use client::{Api, ClientConfig, ClientError};
use proto::{Body, Category, IdempotencyKey, MessageId, Recipient, SubmitRequest};

/// Send and receive referrals through your area's gateway.
///
/// Every command needs --config (or CLIENT_CONFIG): a TOML file naming your
/// gateway, your certificate and key, and your area's CA. `gateway dev`
/// writes one per demo user.
///
/// Exit codes: 0 success; 1 other failure (`read`: a message was refused;
/// a read stopped part way prints what it read, then exits as its cause); 2 bad
/// command line; 3 bad configuration or certificates (expired or revoked
/// included); 4 the gateway refused the request (for example unknown
/// recipient, policy, not found, or another member's change to the case
/// came first: read, then try again); 5 the gateway could not be reached or
/// trusted; 6 `inbox --wait` or `read --wait` ended with nothing new.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Client configuration file.
    #[arg(long, short, env = "CLIENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a message (body from --file or standard input) to a user or team.
    ///
    /// The body is not encrypted by this command (use `refer` and `reply`
    /// for referral content). Where your area has a sharing policy, say
    /// what the body holds with --fields: the gateway refuses what the
    /// policy does not allow, and a message that declares nothing.
    ///
    /// Example: client send --to team:duty@southvale --category relocation --fields chronology --file note.bin
    Send {
        /// Recipient: user:<id>@<area> or team:<id>@<area>.
        #[arg(long)]
        to: Recipient,
        /// Category, e.g. relocation, urgent-risk, update, handover.
        #[arg(long)]
        category: Category,
        /// Mark the message urgent.
        #[arg(long)]
        urgent: bool,
        /// Idempotency key: sending again with the same key never makes a
        /// second message. Default: a fresh random key (printed).
        #[arg(long)]
        key: Option<IdempotencyKey>,
        /// Read the body from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The fields the body holds, as the sharing policy names them
        /// (comma-separated, e.g. chronology,risks): declared under your
        /// area's current policy.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Why it is shared (with --fields).
        #[arg(long, default_value = "safeguarding", requires = "fields")]
        purpose: String,
        /// An area the family fled: nothing that locates them goes there
        /// (repeatable; with --fields).
        #[arg(long = "fled-from", requires = "fields")]
        fled_from: Vec<proto::AreaId>,
    },
    /// List messages waiting for you and your teams, oldest first.
    Inbox {
        /// If the inbox is empty, wait up to this many seconds for a message.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Fetch a message's body (to standard output or --out) and mark it fetched.
    Fetch {
        /// The message id.
        id: MessageId,
        /// Write the body to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Acknowledge a message: tells the sender a person has it.
    Ack {
        /// The message id.
        id: MessageId,
    },
    /// Show the status of a message you sent.
    Status {
        /// The message id.
        id: MessageId,
    },
    /// List what you sent from this client (referrals, case invitations,
    /// replies, messages) with where each is now, newest last: delivered to
    /// the area's gateway, fetched, acknowledged by a person, or
    /// undeliverable and why. `read` also tells you when one comes back
    /// undeliverable.
    ///
    /// Example: client sent --open
    Sent {
        /// Only what was sent in the last this many days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Only what is not yet acknowledged or undeliverable.
        #[arg(long)]
        open: bool,
    },
    /// Publish your MLS KeyPackages so others can add you to referrals.
    ///
    /// Run once after setup. After that `read` publishes fresh ones by
    /// itself when your stock runs low or nears the end of its 12-week
    /// lifetime (it looks once a day); run this again if `read` warns that
    /// it could not.
    Keys {
        /// How many single-use KeyPackages to publish (a last-resort one is added).
        #[arg(long, default_value_t = client::cases::KEY_STOCK)]
        count: usize,
    },
    /// Start an end-to-end encrypted referral to a team or a person: creates
    /// the case's MLS group with their members and sends the body (from
    /// --file or standard input) as its first message.
    ///
    /// Example: client refer --to team:duty@southvale --category relocation --file referral.txt
    Refer {
        /// Recipient: team:<id>@<area> or user:<id>@<area>.
        #[arg(long)]
        to: Recipient,
        /// Category, e.g. relocation, urgent-risk.
        #[arg(long, default_value = "relocation")]
        category: Category,
        /// Mark it urgent.
        #[arg(long)]
        urgent: bool,
        /// Case id to use (default: a new random one, printed).
        #[arg(long)]
        case: Option<String>,
        /// Why it is shared (as the sharing policy names purposes).
        #[arg(long, default_value = "safeguarding")]
        purpose: String,
        /// An area the family fled: nothing that locates them goes there (repeatable).
        #[arg(long = "fled-from")]
        fled_from: Vec<proto::AreaId>,
        /// Idempotency key for the messages (default: random).
        #[arg(long)]
        key: Option<String>,
        /// Read a free-text body from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A structured case file (see `client referral-template`): checked for
        /// victim-blaming language, redacted by the sharing policy for this
        /// recipient, previewed, then sent.
        #[arg(long)]
        case_file: Option<PathBuf>,
        /// Send without asking after the preview.
        #[arg(long)]
        yes: bool,
        /// Keep a flagged phrase, with the reason: --confirm "streetwise=quoting the child's own words" (repeatable; recorded).
        #[arg(long)]
        confirm: Vec<String>,
    },
    /// Take the encrypted case messages from your inbox: join new cases,
    /// decrypt and print messages, apply membership changes, acknowledge.
    Read {
        /// If nothing is waiting, wait up to this many seconds.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Send a reply or update in a case (body from --file or standard input).
    ///
    /// Everyone in the case reads it: a case file is prepared for --to and
    /// sent only if every other address in the case may see all of it.
    /// Areas the family fled, named with --fled-from or recorded for the
    /// case by earlier messages, are kept from learning where they are.
    Reply {
        /// The case id.
        #[arg(long)]
        case: String,
        /// Category.
        #[arg(long, default_value = "update")]
        category: Category,
        /// Why it is shared (as the sharing policy names purposes).
        #[arg(long, default_value = "safeguarding")]
        purpose: String,
        /// An area the family fled: nothing that locates them goes there
        /// (repeatable; those recorded for the case are added).
        #[arg(long = "fled-from")]
        fled_from: Vec<proto::AreaId>,
        /// Read the body from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A structured case file instead of free text (needs --to).
        #[arg(long)]
        case_file: Option<PathBuf>,
        /// Who the case-file disclosure is prepared for (user or team).
        #[arg(long)]
        to: Option<Recipient>,
        /// Send without asking after the preview.
        #[arg(long)]
        yes: bool,
        /// Keep a flagged phrase, with the reason (repeatable; recorded).
        #[arg(long)]
        confirm: Vec<String>,
    },
    /// Print a case-file template to start a structured referral.
    ReferralTemplate,
    /// Add a person or team to an open case.
    Add {
        /// The case id.
        #[arg(long)]
        case: String,
        /// Who: user:<id>@<area> or team:<id>@<area>.
        #[arg(long)]
        to: Recipient,
    },
    /// Hand a case to a new key lead: adds them and removes you in one MLS
    /// commit (your keys no longer read what follows), and sends them the
    /// case chronology.
    Handover {
        /// The case id.
        #[arg(long)]
        case: String,
        /// The new key lead: user:<id>@<area>.
        #[arg(long)]
        to: Recipient,
    },
    /// Print a case's chronology as this client holds it.
    History {
        /// The case id.
        #[arg(long)]
        case: String,
    },
    /// List the cases this client is in.
    Cases,
}

/// The exit code for a client error (see the README's table).
fn exit_code_of(c: &ClientError) -> u8 {
    match c {
        ClientError::Config { .. } | ClientError::Certs(_) | ClientError::Revoked(_) => 3,
        ClientError::Api {
            code: proto::ErrorCode::CertificateRevoked | proto::ErrorCode::CertificateExpired,
            ..
        } => 3,
        ClientError::Api { .. } => 4,
        ClientError::Transport(_) | ClientError::GatewayRevoked(_) => 5,
        _ => 1,
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return exit_code_of(c);
        }
        match cause.downcast_ref::<client::cases::CaseError>() {
            Some(client::cases::CaseError::Client(c)) => return exit_code_of(c),
            // Refused by the gateway (stale_epoch), as an API error is.
            Some(client::cases::CaseError::Overtaken(_)) => return 4,
            _ => {}
        }
    }
    1
}

/// Exit code 6: a wait ended with nothing to show.
#[derive(Debug, thiserror::Error)]
#[error("no messages")]
struct Empty;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Empty>().is_some() => ExitCode::from(6),
        Err(e) => {
            // Errors may quote a gateway or another worker: escaped.
            eprintln!(
                "error: {}",
                client::for_terminal(format!("{e:#}").as_bytes())
            );
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::ReferralTemplate = cli.command {
        print!("{}", client::referral::template());
        return Ok(());
    }
    let path = cli.config.ok_or_else(|| ClientError::Config {
        path: PathBuf::from("(none)"),
        message: "no configuration: pass --config FILE or set CLIENT_CONFIG".into(),
    })?;
    let config = ClientConfig::load(&path)?;
    let api = Api::new(&config)?;
    let json = cli.json;
    let print = |v: &dyn erased::Show| {
        if json {
            println!("{}", v.json());
        } else {
            println!("{}", v.text());
        }
    };
    match cli.command {
        Command::Send {
            to,
            category,
            urgent,
            key,
            file,
            fields,
            purpose,
            fled_from,
        } => {
            let body = match file {
                Some(f) => std::fs::read(&f)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
                None => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
            };
            let key = match key {
                Some(k) => k,
                None => client::fresh_idempotency_key(),
            };
            let disclosure = if fields.is_empty() {
                None
            } else {
                let policy =
                    client::cases::home_policy(&api, &config.area, config.policy_key.as_deref())
                        .await?
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{} publishes no sharing policy, so nothing can be declared under it: send without --fields",
                                config.area
                            )
                        })?;
                Some(proto::Disclosure {
                    policy_id: policy.id().to_string(),
                    policy_version: policy.version(),
                    purpose,
                    fields,
                    fled_from,
                })
            };
            let req = SubmitRequest {
                idempotency_key: key.clone(),
                recipient: to,
                category,
                urgent,
                kind: proto::MessageKind::Opaque,
                disclosure,
                commit_proof: None,
                body: Body(body),
            };
            let area = req.recipient.area.clone();
            let r = api.submit(&req).await?;
            if let Some(w) = &r.waiting {
                eprintln!("warning: {}", client::waiting_note(&area, w));
            }
            // Also a repeat: the first try may have reached the gateway
            // unrecorded (the record keeps a message once).
            let entry = client::sent::SentEntry::now(
                r.message_id.clone(),
                &req.recipient.to_string(),
                "message",
                None,
                &req.category,
            );
            if let Err(e) = sent_log(&config).record(entry) {
                eprintln!("warning: sent, but not recorded for `client sent`: {e}");
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let dup = if r.duplicate {
                    " (already sent with this key; nothing new sent)"
                } else {
                    ""
                };
                println!("{}\t{}\tkey={key}{dup}", r.message_id, r.status);
            }
        }
        Command::Inbox { wait } => {
            let r = api.inbox(Duration::from_secs(wait)).await?;
            print(&r);
            if wait > 0 && r.messages.is_empty() {
                return Err(Empty.into());
            }
        }
        Command::Fetch { id, out } => {
            let r = api.fetch(&id).await?;
            match out {
                Some(path) => std::fs::write(&path, &r.body.0)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
                None if json => println!("{}", serde_json::to_string(&r)?),
                None => std::io::stdout().write_all(&r.body.0)?,
            }
            if !json {
                eprintln!(
                    "message {} from {} ({}{}, {} bytes, {})",
                    r.envelope.message_id,
                    r.envelope.sender,
                    r.envelope.category,
                    if r.envelope.urgent { ", URGENT" } else { "" },
                    r.body.len(),
                    r.envelope.content_hash
                );
            }
        }
        Command::Ack { id } => {
            let status = api.ack(&id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "message_id": id, "status": status })
                );
            } else {
                println!("{id}\t{status}");
            }
        }
        Command::Status { id } => {
            let r = api.status(&id).await?;
            print(&r);
        }
        Command::Sent { days, open } => {
            let since = client::now_ms().saturating_sub(days.saturating_mul(86_400_000));
            let rows = client::sent::check(
                &sent_log(&config),
                &api,
                since,
                open,
                client::sent::Ask::Newest(SENT_ASK_AT_MOST),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else if rows.is_empty() {
                println!("nothing sent from this client in the last {days} days");
            } else {
                for line in sent_lines(&rows) {
                    println!("{line}");
                }
            }
        }
        other => cases_command(&config, api, other, json).await?,
    }
    Ok(())
}

/// Parses, lints, redacts and previews a case file for `to`; returns the
/// disclosed bytes and the disclosure to declare.
#[allow(clippy::too_many_arguments)]
async fn prepare_case_file(
    config: &ClientConfig,
    cw: &mut client::cases::Caseworker,
    path: &std::path::Path,
    readers: &[Recipient],
    category: &Category,
    purpose: &str,
    fled_from: &[proto::AreaId],
    yes: bool,
    confirm: &[String],
) -> anyhow::Result<(Vec<u8>, proto::Disclosure)> {
    // The first is the one named (`--to`); every member of a case reads
    // what is sent in it, so the others must be allowed the same.
    let Some((to, others)) = readers.split_first() else {
        anyhow::bail!("no one to send to");
    };
    use client::lint::{ConfirmTarget, Confirmation, Lint};
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let case = client::referral::parse_case_toml(&text)?;
    // The language check: refuse until each flagged phrase is rephrased or confirmed with a reason.
    let findings = Lint::new(&[])?.check(&case);
    let confirmations: Vec<Confirmation> = confirm
        .iter()
        .map(|c| {
            let (phrase, reason) = c.split_once('=').unwrap_or((c.as_str(), ""));
            Confirmation {
                target: ConfirmTarget::Phrase(phrase.trim().to_owned()),
                reason: reason.trim().to_owned(),
            }
        })
        .collect();
    if let Err(e) = client::lint::require_resolved(&findings, &confirmations) {
        for f in &findings {
            eprintln!(
                "{}: \"{}\" — {}\n    in: {}",
                f.field_path, f.phrase, f.suggestion, f.excerpt
            );
        }
        anyhow::bail!("{e}\nRephrase, or keep a phrase with --confirm \"<phrase>=<reason>\" (the reason is recorded)");
    }
    let recorded = client::lint::require_resolved(&findings, &confirmations)?;
    let policy = cw.policy().await?.cloned().ok_or_else(|| {
        anyhow::anyhow!("this area publishes no sharing policy: nothing may be disclosed")
    })?;
    let me = cw.whoami().await?;
    let creds = certs::Credentials::load(&config.cert, &config.key)?;
    let peer = certs::verify_own_certificate(&creds, &certs::load_certs(&config.ca)?)?;
    let sender = policy::SenderContext::new(
        &peer,
        policy::Organisation::new(me.organisation.as_str())?,
        policy::Role::new(me.role.as_str())?,
    )?;
    let context = |r: &Recipient| policy::RecipientContext {
        recipient: r.clone(),
        organisation: None,
        role: None,
    };
    let recipient = context(to);
    let facts = policy::Facts {
        category: category.clone(),
        purpose: policy::Purpose::new(purpose)?,
        cited: policy::PolicyRef {
            id: policy.id().clone(),
            version: policy.version(),
        },
        fled_from: fled_from.to_vec(),
    };
    let fields = client::referral::to_policy_fields(&case)?;
    let days = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 86_400) as i64;
    let today = civil_from_days(days)?;
    let prepared = policy.prepare(&sender, &recipient, &facts, &fields, today);
    eprintln!("{}", client::referral::preview(&prepared));
    // Safeguarding to 18; then the transition to adult services the policy names.
    match &prepared.age_route {
        Some(policy::AgeRoute::Adult {
            age,
            adult_services,
        }) if adult_services != to => {
            anyhow::bail!(
                "the young person is {age}: children's safeguarding ends at 18; send this to adult services, {adult_services}, as the policy names"
            );
        }
        Some(policy::AgeRoute::Child {
            turning_18_soon: true,
            turns_18_on,
            ..
        }) => {
            eprintln!("note: turns 18 on {turns_18_on}: plan the transition to adult services now");
        }
        _ => {}
    }
    if !prepared.decision.is_allowed() {
        anyhow::bail!(
            "the sharing policy does not allow this: {}",
            prepared.decision.reason
        );
    }
    let body = client::referral::disclosed_bytes(&prepared.content);
    for other in others {
        // Each field sent must be one `other` may see, as it is sent.
        let theirs = policy.prepare(&sender, &context(other), &facts, &fields, today);
        let within = prepared
            .content
            .iter()
            .all(|(path, value)| theirs.content.get(path) == Some(value));
        if !theirs.decision.is_allowed() || !within {
            anyhow::bail!(
                "{other} is in this case too and reads every message sent in it, but the sharing policy lets it see less than {to}{}: prepare the case file with --to {other} (the most restricted reader), or share this outside the case",
                if theirs.decision.is_allowed() {
                    String::new()
                } else {
                    format!(" ({})", theirs.decision.reason)
                }
            );
        }
    }
    if !yes {
        let list: Vec<String> = readers.iter().map(ToString::to_string).collect();
        eprint!("Send exactly this to {}? [y/N] ", list.join(", "));
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            anyhow::bail!("not sent");
        }
    }
    if !recorded.is_empty() {
        let dir = config.data_directory();
        let line = serde_json::to_string(
            &serde_json::json!({ "case_file": path.display().to_string(), "confirmed": recorded }),
        )?;
        client::private_dir(&dir)?;
        let mut f = client::private_file()
            .create(true)
            .append(true)
            .open(dir.join("language-confirmations.jsonl"))?;
        writeln!(f, "{line}")?;
    }
    let disclosure = proto::Disclosure {
        policy_id: policy.id().to_string(),
        policy_version: policy.version(),
        purpose: purpose.to_owned(),
        fields: prepared
            .declared_fields
            .iter()
            .map(|f| f.to_string())
            .collect(),
        fled_from: fled_from.to_vec(),
    };
    Ok((body, disclosure))
}

/// The calendar date of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> anyhow::Result<policy::Date> {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as u16;
    Ok(policy::Date::new(y, m, d)?)
}

fn read_body(file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(f) => {
            std::fs::read(&f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))
        }
        None => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            Ok(b)
        }
    }
}

async fn cases_command(
    config: &ClientConfig,
    api: Api,
    command: Command,
    json: bool,
) -> anyhow::Result<()> {
    use client::cases::{Caseworker, Event};
    let mut cw = Caseworker::open(config, api)?;
    match command {
        Command::Keys { count } => {
            let stock = cw.publish_keys(count).await?;
            println!(
                "published {} KeyPackages; {} available, last resort: {}",
                stock.stored, stock.available, stock.last_resort
            );
        }
        Command::Refer {
            to,
            category,
            urgent,
            case,
            key,
            file,
            purpose,
            fled_from,
            case_file,
            yes,
            confirm,
        } => {
            let (body, disclosure) = match case_file {
                Some(path) => {
                    let (body, d) = prepare_case_file(
                        config,
                        &mut cw,
                        &path,
                        std::slice::from_ref(&to),
                        &category,
                        &purpose,
                        &fled_from,
                        yes,
                        &confirm,
                    )
                    .await?;
                    (body, Some(d))
                }
                None => {
                    let body = read_body(file)?;
                    (
                        body,
                        cw.declare(&purpose, vec!["chronology".into()], fled_from.clone())
                            .await?,
                    )
                }
            };
            let (case_id, missing) = cw
                .refer(&to, &category, urgent, &body, case, key, disclosure)
                .await?;
            println!("{case_id}");
            for m in missing {
                // As the gateway named them: escaped.
                let to = client::one_line(&client::cases::address_of(&m).unwrap_or(m));
                eprintln!("warning: {to} has published no keys and was not added; once they have run `client keys`, add them with `client add --case {case_id} --to {to}`");
            }
        }
        Command::Read { wait } => {
            // Each event is shown as it is read, before its message is
            // acknowledged; what was read before a failure is shown before
            // the failure.
            cw.show_as_read(Box::new(move |e| show_event(e, json)));
            let (events, stopped) = match cw.read(Duration::from_secs(wait)).await {
                Ok(events) => (events, None),
                Err(client::cases::CaseError::Interrupted { events, error }) => {
                    (events, Some(*error))
                }
                Err(e) => return Err(e.into()),
            };
            let refused = events.iter().any(|e| matches!(e, Event::Refused { .. }));
            // A summary line: as it is, or as a JSON event of `kind`.
            let say = |kind: &str, key: &str, line: &str| {
                if json {
                    println!("{}", serde_json::json!({ "event": kind, key: line }));
                } else {
                    println!("{line}");
                }
            };
            for line in not_in_case_lines(&events) {
                say("not_in_case", "text", &line);
            }
            if let Some(e) = stopped {
                return Err(anyhow::Error::new(e).context(format!(
                    "read stopped after {} event(s); run it again for the rest",
                    events.len()
                )));
            }
            // What this worker sent that came back since the last look.
            let since = client::now_ms().saturating_sub(SENT_NEWS_DAYS * 86_400_000);
            let mut came_back = 0;
            match client::sent::check(
                &sent_log(config),
                cw.api(),
                since,
                true,
                client::sent::Ask::Sample(READ_ASKS_AT_MOST),
            )
            .await
            {
                Ok(rows) => {
                    for line in came_back_lines(&rows) {
                        came_back += 1;
                        say("came_back", "came_back", &line);
                    }
                }
                Err(e) => eprintln!(
                    "warning: could not check what you sent: {}",
                    client::one_line(&e.to_string())
                ),
            }
            if refused {
                anyhow::bail!("some messages were refused (see above); they stay in the inbox");
            }
            if events.is_empty() && came_back == 0 && wait > 0 {
                return Err(Empty.into());
            }
        }
        Command::Reply {
            case,
            category,
            file,
            purpose,
            fled_from,
            case_file,
            to,
            yes,
            confirm,
        } => {
            // The areas the family fled, as recorded for the case, are kept
            // from learning where they are now, named again or not.
            let mut fled_from = fled_from;
            for area in cw.fled_from(&case) {
                if !fled_from.contains(&area) {
                    eprintln!("note: the family fled {area} (recorded for case {case}): nothing it may not see is sent to it");
                    fled_from.push(area);
                }
            }
            let (body, disclosure) = match case_file {
                Some(path) => {
                    let to = to.ok_or_else(|| {
                        anyhow::anyhow!(
                            "--case-file needs --to: who the disclosure is prepared for"
                        )
                    })?;
                    // Everyone in the case reads the reply, not only `to`.
                    let mut readers = vec![to.clone()];
                    readers.extend(cw.addresses(&case).into_iter().filter(|r| *r != to));
                    let (body, d) = prepare_case_file(
                        config, &mut cw, &path, &readers, &category, &purpose, &fled_from, yes,
                        &confirm,
                    )
                    .await?;
                    (body, Some(d))
                }
                None => {
                    let body = read_body(file)?;
                    (
                        body,
                        cw.declare(&purpose, vec!["chronology".into()], fled_from)
                            .await?,
                    )
                }
            };
            let ids = cw.send(&case, &category, &body, None, disclosure).await?;
            println!("sent to {} address(es)", ids.len());
        }
        Command::Add { case, to } => {
            let missing = cw.add(&case, &to, None).await?;
            println!("added {to} to case {case}");
            for m in missing {
                eprintln!(
                    "warning: {} has published no keys and was not added",
                    client::one_line(&m)
                );
            }
        }
        Command::Handover { case, to } => {
            cw.handover(&case, &to, None).await?;
            println!("case {case}: handover to {to} requested; it takes effect when the first remaining member of the case (by identity) reads (their client commits it), and from then on this client can no longer read the case");
        }
        Command::History { case } => {
            // Its senders and who handed entries over are as a history
            // export said: escaped (see `HistoryEntry`'s `Display`).
            for e in cw.history(&case)? {
                println!("{e}");
            }
        }
        Command::ReferralTemplate => print!("{}", client::referral::template()),
        Command::Cases => {
            for c in cw.cases()? {
                println!("{c}");
            }
        }
        _ => {}
    }
    Ok(())
}

/// Text and JSON renderings of answers.
mod erased {
    use proto::{InboxResponse, StatusResponse};

    pub(crate) trait Show {
        fn text(&self) -> String;
        fn json(&self) -> String;
    }

    impl Show for InboxResponse {
        fn text(&self) -> String {
            if self.messages.is_empty() {
                return "inbox is empty".into();
            }
            let mut out = String::from("MESSAGE ID                        STATUS     FROM                         TO                           CATEGORY");
            for m in &self.messages {
                let e = &m.envelope;
                out.push_str(&format!(
                    "\n{} {:<10} {:<28} {:<28} {}{}",
                    e.message_id,
                    m.status.as_str(),
                    e.sender.to_string(),
                    e.recipient.to_string(),
                    e.category,
                    if e.urgent { " URGENT" } else { "" }
                ));
            }
            out
        }
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }

    impl Show for StatusResponse {
        fn text(&self) -> String {
            let mut out = format!("{} to {}: {}", self.message_id, self.recipient, self.status);
            for ev in &self.history {
                out.push_str(&format!(
                    "\n  {:<13} {}",
                    ev.status.as_str(),
                    client::time_text(ev.at_ms, true)
                ));
                if let Some(r) = &ev.reason {
                    // A peer gateway's words: shown, never obeyed.
                    out.push_str(&format!(" — {}", client::one_line(r)));
                }
            }
            if let Some(w) = &self.waiting {
                out.push_str(&format!(
                    "\n  waiting: {}",
                    client::waiting_note(&self.recipient.area, w)
                ));
            }
            out
        }
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// Shows an event of `read` as it is read: one JSON object per line
/// (`json`), or its text, safe for the terminal (see `Event`'s `Display`):
/// refusals on standard error. Messages in cases the reader is not part of
/// are summed up after (a newcomer to a team may have many). An error
/// (standard output closed) stops the read before its message is
/// acknowledged.
fn show_event(e: &client::cases::Event, json: bool) -> std::io::Result<()> {
    use client::cases::Event;
    use std::io::Write as _;
    if json {
        return match event_json(e) {
            Some(v) => writeln!(std::io::stdout(), "{v}"),
            None => Ok(()),
        };
    }
    match e {
        Event::NotInCase { .. } => Ok(()),
        Event::HandoverRefused { .. } | Event::Refused { .. } => {
            writeln!(std::io::stderr(), "{e}")
        }
        _ => writeln!(std::io::stdout(), "{e}"),
    }
}

/// An event of `read` as one JSON object (`event` names its kind); `None`
/// for one summed up elsewhere (`not_in_case`).
fn event_json(e: &client::cases::Event) -> Option<serde_json::Value> {
    use client::cases::Event;
    use serde_json::json;
    Some(match e {
        Event::Joined { case_id, from } => {
            json!({ "event": "joined", "case": case_id, "from": from })
        }
        Event::Message {
            case_id,
            from,
            plaintext,
        } => json!({
            "event": "message",
            "case": case_id,
            "from": from,
            "text": String::from_utf8_lossy(plaintext),
        }),
        Event::Membership {
            case_id,
            added,
            removed,
        } => json!({ "event": "membership", "case": case_id, "added": added, "removed": removed }),
        Event::Removed { case_id } => json!({ "event": "removed", "case": case_id }),
        Event::Overtaken { case_id } => json!({ "event": "overtaken", "case": case_id }),
        Event::History {
            case_id,
            from,
            entries,
        } => json!({ "event": "history", "case": case_id, "from": from, "entries": entries }),
        Event::HandoverRefused { case_id, from } => {
            json!({ "event": "handover_refused", "case": case_id, "from": from })
        }
        Event::ReadBefore {
            message_id,
            from,
            case_id,
        } => json!({
            "event": "read_before",
            "message_id": message_id.to_string(),
            "from": from,
            "case": case_id,
        }),
        Event::Waiting { message_id, from } => json!({
            "event": "waiting",
            "message_id": message_id.to_string(),
            "from": from,
        }),
        Event::Refused {
            message_id,
            from,
            error,
        } => json!({
            "event": "refused",
            "message_id": message_id.to_string(),
            "from": from,
            "error": error,
        }),
        _ => return None,
    })
}

/// One line per team for the messages to it in cases the reader is not
/// part of ([`Event::NotInCase`]), with who sent them: a newcomer to a
/// team may get many at once.
fn not_in_case_lines(events: &[client::cases::Event]) -> Vec<String> {
    let mut by_team: std::collections::BTreeMap<&str, (usize, std::collections::BTreeSet<&str>)> =
        Default::default();
    for e in events {
        if let client::cases::Event::NotInCase { from, to, .. } = e {
            let (n, senders) = by_team.entry(to.as_str()).or_default();
            *n += 1;
            senders.insert(from.as_str());
        }
    }
    by_team
        .into_iter()
        .map(|(to, (n, senders))| {
            let senders: Vec<&str> = senders.into_iter().collect();
            let senders = senders.join(", ");
            if n == 1 {
                format!(
                    "1 message to {to} (from {senders}) is in a case you are not part of: it \
                     began before you joined the team, or you were not added; if you need it, \
                     ask the case's lead to add you"
                )
            } else {
                format!(
                    "{n} messages to {to} (from {senders}) are in cases you are not part of: \
                     they began before you joined the team, or you were not added; if you need \
                     one, ask its case's lead to add you"
                )
            }
        })
        .collect()
}

/// How far back `read` looks for sent messages that came back.
const SENT_NEWS_DAYS: u64 = 30;

/// How many open sent messages `read` asks the gateway about (picked at
/// random, so successive reads reach them all), well within a user's
/// request burst: `read --wait` may run in a loop.
const READ_ASKS_AT_MOST: usize = 20;

/// How many open sent messages `sent` asks the gateway about (the newest).
const SENT_ASK_AT_MOST: usize = 150;

/// The record of what this client sent, in its data directory.
fn sent_log(config: &ClientConfig) -> client::sent::SentLog {
    client::sent::SentLog::in_dir(&config.data_directory())
}

/// `client sent`: one line per message, and the reason under one that is
/// undeliverable or waiting.
fn sent_lines(rows: &[client::sent::Checked]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<20}  {:<15}  {:<28}  {:<22}  STATUS",
        "SENT", "WHAT", "TO", "CASE"
    )];
    for r in rows {
        let e = &r.entry;
        let status = match (&r.status, &r.error) {
            (Some(s), _) => s.as_str().to_owned(),
            (None, Some(err)) => format!("unknown ({})", client::one_line(err)),
            (None, None) => "unknown".to_owned(),
        };
        out.push(format!(
            "{:<20}  {:<15}  {:<28}  {:<22}  {status}",
            client::time_text(e.at_ms, false),
            e.what,
            e.to,
            e.case.as_deref().unwrap_or("-")
        ));
        if let Some(reason) = &r.reason {
            out.push(format!("    why: {}", client::one_line(reason)));
        }
        if let (Some(w), Ok(to)) = (&r.waiting, e.to.parse::<Recipient>()) {
            out.push(format!("    {}", client::waiting_note(&to.area, w)));
        }
    }
    out
}

/// `client read`: what this worker sent that has come back undeliverable
/// since they last looked, each once.
fn came_back_lines(rows: &[client::sent::Checked]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.newly_final && r.status == Some(proto::Status::Undeliverable))
        .map(|r| {
            let e = &r.entry;
            let case = e
                .case
                .as_deref()
                .map(|c| format!(" in case {c}"))
                .unwrap_or_default();
            format!(
                "UNDELIVERABLE: your {}{case} to {} (sent {}) came back: {}",
                e.what,
                e.to,
                client::time_text(e.at_ms, false),
                client::one_line(r.reason.as_deref().unwrap_or("no reason given"))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_of_read_is_one_json_object_naming_its_kind() {
        use client::cases::Event;
        let events = [
            Event::Joined {
                case_id: "c".into(),
                from: "alice".into(),
            },
            Event::Message {
                case_id: "c".into(),
                from: "alice".into(),
                plaintext: b"hello\x1b[2K".to_vec(),
            },
            Event::Membership {
                case_id: "c".into(),
                added: vec!["erin".into()],
                removed: vec![],
            },
            Event::Removed {
                case_id: "c".into(),
            },
            Event::Overtaken {
                case_id: "c".into(),
            },
            Event::History {
                case_id: "c".into(),
                from: "bob".into(),
                entries: 3,
            },
            Event::Waiting {
                message_id: proto::MessageId::from_bytes([2; 16]),
                from: "bob".into(),
            },
            Event::ReadBefore {
                message_id: proto::MessageId::from_bytes([3; 16]),
                from: "bob".into(),
                case_id: Some("c".into()),
            },
            Event::Refused {
                message_id: proto::MessageId::from_bytes([1; 16]),
                from: "mallory".into(),
                error: "tampered".into(),
            },
        ];
        let kinds: Vec<String> = events
            .iter()
            .map(|e| {
                let line = event_json(e).unwrap().to_string();
                assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                v["event"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "joined",
                "message",
                "membership",
                "removed",
                "overtaken",
                "history",
                "waiting",
                "read_before",
                "refused"
            ]
        );
    }

    #[test]
    fn messages_in_cases_one_is_not_part_of_are_summed_up_per_team() {
        use client::cases::Event;
        let not_in_case = |n: u8, from: &str, to: &str| Event::NotInCase {
            message_id: proto::MessageId::from_bytes([n; 16]),
            from: from.into(),
            to: to.into(),
        };
        let events = vec![
            not_in_case(1, "user:alice@northshire", "team:duty@southvale"),
            Event::Removed {
                case_id: "case-1".into(),
            },
            not_in_case(2, "user:dan@southvale", "team:duty@southvale"),
            not_in_case(3, "user:alice@northshire", "team:duty@southvale"),
            not_in_case(4, "user:hana@eastmoor", "team:fostering@southvale"),
        ];
        assert_eq!(
            not_in_case_lines(&events),
            [
                "3 messages to team:duty@southvale (from user:alice@northshire, user:dan@southvale) \
                 are in cases you are not part of: they began before you joined the team, or you \
                 were not added; if you need one, ask its case's lead to add you",
                "1 message to team:fostering@southvale (from user:hana@eastmoor) is in a case you \
                 are not part of: it began before you joined the team, or you were not added; if \
                 you need it, ask the case's lead to add you",
            ]
        );
        assert!(not_in_case_lines(&events[1..2]).is_empty());
    }

    fn checked(n: u8, status: Option<proto::Status>, newly_final: bool) -> client::sent::Checked {
        client::sent::Checked {
            entry: client::sent::SentEntry {
                message_id: proto::MessageId::from_bytes([n; 16]),
                to: "team:duty@southvale".into(),
                what: "referral".into(),
                case: Some("case-7".into()),
                category: "relocation".into(),
                at_ms: 1_795_000_000_000,
            },
            status,
            reason: (status == Some(proto::Status::Undeliverable)).then(|| "no one read it".into()),
            waiting: None,
            newly_final,
            error: None,
        }
    }

    #[test]
    fn sent_messages_are_listed_with_their_status_and_why_one_came_back() {
        let mut waiting = checked(3, Some(proto::Status::Accepted), false);
        waiting.waiting = Some(proto::Waiting {
            since_ms: 1_795_000_000_000,
            last_error: "connection refused".into(),
        });
        let mut unknown = checked(4, None, false);
        unknown.error = Some("gateway refused (404, NotFound): no such message".into());
        let lines = sent_lines(&[
            checked(1, Some(proto::Status::Acknowledged), false),
            checked(2, Some(proto::Status::Undeliverable), true),
            waiting,
            unknown,
        ]);
        let expected_row = |status: &str| {
            format!(
                "{:<20}  {:<15}  {:<28}  {:<22}  {status}",
                "2026-11-18T11:06:40Z", "referral", "team:duty@southvale", "case-7"
            )
        };
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert!(lines[0].starts_with("SENT"), "{}", lines[0]);
        assert_eq!(lines[1], expected_row("acknowledged"));
        assert_eq!(lines[2], expected_row("undeliverable"));
        assert_eq!(lines[3], "    why: no one read it");
        assert_eq!(lines[4], expected_row("accepted"));
        assert!(
            lines[5].contains("southvale's gateway has not taken messages since")
                && lines[5].contains("connection refused"),
            "{}",
            lines[5]
        );
        assert_eq!(
            lines[6],
            expected_row("unknown (gateway refused (404, NotFound): no such message)")
        );
    }

    #[test]
    fn read_tells_of_what_came_back_undeliverable_once() {
        let rows = [
            checked(1, Some(proto::Status::Acknowledged), true),
            checked(2, Some(proto::Status::Undeliverable), true),
            // Told at an earlier read.
            checked(3, Some(proto::Status::Undeliverable), false),
            checked(4, Some(proto::Status::Delivered), false),
        ];
        assert_eq!(
            came_back_lines(&rows),
            [
                "UNDELIVERABLE: your referral in case case-7 to team:duty@southvale \
              (sent 2026-11-18T11:06:40Z) came back: no one read it"
            ]
        );
    }

    fn api(code: proto::ErrorCode) -> ClientError {
        ClientError::Api {
            status: 403,
            code,
            message: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn a_revoked_certificate_exits_as_a_certificate_problem() {
        assert_eq!(exit_code_of(&ClientError::Revoked("alert".into())), 3);
        assert_eq!(exit_code_of(&api(proto::ErrorCode::CertificateRevoked)), 3);
        assert_eq!(exit_code_of(&api(proto::ErrorCode::CertificateExpired)), 3);
        assert_eq!(exit_code_of(&api(proto::ErrorCode::Forbidden)), 4);
        assert_eq!(exit_code_of(&ClientError::Transport("refused".into())), 5);
        assert_eq!(exit_code_of(&ClientError::GatewayRevoked("crl".into())), 5);
        let wrapped = anyhow::Error::new(ClientError::Revoked("alert".into())).context("send");
        assert_eq!(exit_code(&wrapped), 3);
    }
}
