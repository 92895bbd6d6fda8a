//! Client-side MLS costs: our `client::mls` (openmls plus durable SQLite
//! state) against raw openmls operations (in memory), measured in one run.

use std::time::Instant;

use anyhow::Context as _;
use client::mls::MlsClient;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage, MlsGroup, MlsGroupCreateConfig,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage, StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

fn mean_us(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len().max(1) as f64
}

struct Raw {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl Raw {
    fn new(name: &str) -> anyhow::Result<Raw> {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(SUITE.signature_algorithm())?;
        signer.store(openmls::prelude::OpenMlsProvider::storage(&provider))?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.to_public_vec().into(),
        };
        Ok(Raw {
            provider,
            signer,
            credential,
        })
    }

    fn key_package(&self) -> anyhow::Result<KeyPackage> {
        Ok(KeyPackage::builder()
            .build(SUITE, &self.provider, &self.signer, self.credential.clone())?
            .key_package()
            .clone())
    }
}

/// Prints the comparison table.
pub(crate) async fn run(rounds: usize, team: usize, body: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plaintext = vec![b'm'; body];
    let (mut raw_kp, mut raw_create, mut raw_enc, mut raw_join, mut raw_dec) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut our_kp, mut our_refer, mut our_follow, mut our_join, mut our_dec) =
        (vec![], vec![], vec![], vec![], vec![]);
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(SUITE)
        .use_ratchet_tree_extension(true)
        .build();
    let join_config = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .build();
    for round in 0..rounds {
        // === raw openmls, in memory ===
        let creator = Raw::new("creator")?;
        let members: Vec<Raw> = (0..team)
            .map(|i| Raw::new(&format!("m{i}")))
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        let kps: Vec<KeyPackage> = members
            .iter()
            .map(|m| m.key_package())
            .collect::<Result<_, _>>()?;
        raw_kp.push(t.elapsed().as_secs_f64() * 1e6 / team as f64);
        let t = Instant::now();
        let mut group = MlsGroup::new(
            &creator.provider,
            &creator.signer,
            &config,
            creator.credential.clone(),
        )?;
        let (_commit, welcome, _) = group.add_members(&creator.provider, &creator.signer, &kps)?;
        group.merge_pending_commit(&creator.provider)?;
        let welcome = welcome.tls_serialize_detached()?;
        let first = group
            .create_message(&creator.provider, &creator.signer, &plaintext)?
            .tls_serialize_detached()?;
        raw_create.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let follow = group
            .create_message(&creator.provider, &creator.signer, &plaintext)?
            .tls_serialize_detached()?;
        raw_enc.push(t.elapsed().as_secs_f64() * 1e6);
        let m0 = &members[0];
        let t = Instant::now();
        let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(&welcome)?.extract()
        else {
            anyhow::bail!("not a welcome");
        };
        let mut joined = StagedWelcome::new_from_welcome(&m0.provider, &join_config, w, None)?
            .into_group(&m0.provider)?;
        raw_join.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        for bytes in [&first, &follow] {
            let msg = MlsMessageIn::tls_deserialize_exact(bytes)?;
            let protocol: ProtocolMessage = match msg.extract() {
                MlsMessageBodyIn::PrivateMessage(m) => m.into(),
                _ => anyhow::bail!("not a private message"),
            };
            joined.process_message(&m0.provider, protocol)?;
        }
        raw_dec.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);

        // === client::mls: the same, with durable state ===
        let base = dir.path().join(format!("r{round}"));
        let mut sender = MlsClient::open(&base.join("sender"), "spiffe://northshire/user/alice")
            .context("sender")?;
        let mut receivers: Vec<MlsClient> = (0..team)
            .map(|i| {
                MlsClient::open(
                    &base.join(format!("m{i}")),
                    &format!("spiffe://southvale/user/m{i}"),
                )
            })
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        let kps: Vec<Vec<u8>> = receivers
            .iter_mut()
            .map(|r| r.key_packages(1).map(|mut v| v.remove(0)))
            .collect::<Result<_, _>>()?;
        our_kp.push(t.elapsed().as_secs_f64() * 1e6 / team as f64);
        let t = Instant::now();
        let g = sender.create_group(&format!("case-{round}"))?;
        let (_commit, welcome) = sender.add_members(&g, &kps)?;
        let first = sender.encrypt(&g, &plaintext)?;
        our_refer.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let follow = sender.encrypt(&g, &plaintext)?;
        our_follow.push(t.elapsed().as_secs_f64() * 1e6);
        let r0 = &mut receivers[0];
        let t = Instant::now();
        r0.join(&welcome)?;
        our_join.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        r0.process(&first)?;
        r0.process(&follow)?;
        our_dec.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    println!(
        "\nMLS client costs, team of {team}, {body} B messages, mean of {rounds} rounds (µs):"
    );
    println!(
        "{:<44} | {:>10} | {:>10} | {:>6}",
        "operation", "raw openmls", "client::mls", "ratio"
    );
    let rows = [
        ("KeyPackage (each)", &raw_kp, &our_kp),
        (
            "create referral: group + add team + Welcome + 1 message",
            &raw_create,
            &our_refer,
        ),
        ("follow-up message (encrypt)", &raw_enc, &our_follow),
        ("join from Welcome (receiver)", &raw_join, &our_join),
        ("decrypt a message (receiver)", &raw_dec, &our_dec),
    ];
    for (name, raw, ours) in rows {
        let (r, o) = (mean_us(raw), mean_us(ours));
        println!(
            "{name:<44} | {r:>10.0} | {o:>10.0} | {:>5.1}x",
            o / r.max(1.0)
        );
    }
    println!("(client::mls adds durable SQLite state with synchronous=FULL to every operation)");
    Ok(())
}
