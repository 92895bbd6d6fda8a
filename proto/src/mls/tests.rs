//! Tests of the MLS framing parser against bytes made by openmls 0.9, and
//! against hand-built structures for the cases openmls will not produce.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer as _, SigningKey};
use openmls::prelude as om;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;

use super::reader::{write_opaque, Reader};
use super::*;

const CS: om::Ciphersuite = om::Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
const DAN: &str = "spiffe://southvale/user/dan";

// === openmls fixtures ===

/// One MLS client: its provider (which holds its private keys), signer and
/// credential.
struct Client {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: om::CredentialWithKey,
}

impl Client {
    fn new(identity: &str) -> Self {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
        let credential = om::CredentialWithKey {
            credential: om::BasicCredential::new(identity.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Self {
            provider,
            signer,
            credential,
        }
    }

    fn key_package(&self, last_resort: bool) -> om::KeyPackage {
        let mut builder = om::KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        builder
            .build(CS, &self.provider, &self.signer, self.credential.clone())
            .unwrap()
            .key_package()
            .clone()
    }

    fn hash_ref(&self, key_package: &om::KeyPackage) -> KeyPackageRef {
        let r = key_package.hash_ref(self.provider.crypto()).unwrap();
        KeyPackageRef::try_from(r.as_slice()).unwrap()
    }
}

fn ser(value: &impl om::tls_codec::Serialize) -> Vec<u8> {
    value.tls_serialize_detached().unwrap()
}

/// A group of three (alice creates it and adds bob and carol) and the
/// messages that made it, with the given wire format policy.
struct Scenario {
    alice: Client,
    group: om::MlsGroup,
    member_refs: Vec<KeyPackageRef>,
    commit: Vec<u8>,
    welcome: Vec<u8>,
    epoch_before_commit: u64,
}

fn scenario(policy: om::WireFormatPolicy) -> Scenario {
    let alice = Client::new(DAN);
    let bob = Client::new("spiffe://northmoor/user/bob");
    let carol = Client::new("spiffe://northmoor/user/carol");
    let config = om::MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .wire_format_policy(policy)
        .use_ratchet_tree_extension(true)
        .build();
    let mut group = om::MlsGroup::new(
        &alice.provider,
        &alice.signer,
        &config,
        alice.credential.clone(),
    )
    .unwrap();
    let kp_bob = bob.key_package(false);
    let kp_carol = carol.key_package(false);
    let member_refs = vec![bob.hash_ref(&kp_bob), carol.hash_ref(&kp_carol)];
    let epoch_before_commit = group.epoch().as_u64();
    let (commit, welcome, _group_info) = group
        .add_members(&alice.provider, &alice.signer, &[kp_bob, kp_carol])
        .unwrap();
    group.merge_pending_commit(&alice.provider).unwrap();
    Scenario {
        alice,
        group,
        member_refs,
        commit: ser(&commit),
        welcome: ser(&welcome),
        epoch_before_commit,
    }
}

// === KeyPackage from openmls ===

#[test]
fn openmls_key_package_parses() {
    let dan = Client::new(DAN);
    let kp = dan.key_package(false);
    let bytes = ser(&kp);
    let info = KeyPackageInfo::parse(&bytes).unwrap();
    assert_eq!(info.identity(), DAN);
    assert_eq!(info.signature_key().as_slice(), dan.signer.public());
    assert_eq!(info.init_key().as_slice(), kp.hpke_init_key().as_slice());
    // EncryptionKey serialises as opaque<V>: a one-byte length, then the key.
    assert_eq!(
        info.encryption_key().as_slice(),
        &ser(kp.leaf_node().encryption_key())[1..]
    );
    assert_eq!(info.key_package_ref(), dan.hash_ref(&kp));
    assert!(!info.is_last_resort());
    assert_eq!(info.lifetime().not_before, kp.life_time().not_before());
    assert_eq!(info.lifetime().not_after, kp.life_time().not_after());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(info.lifetime().contains(now));
}

#[test]
fn openmls_last_resort_key_package_is_flagged() {
    let dan = Client::new(DAN);
    let kp = dan.key_package(true);
    assert!(kp.last_resort());
    let info = KeyPackageInfo::parse(&ser(&kp)).unwrap();
    assert!(info.is_last_resort());
    assert_eq!(info.key_package_ref(), dan.hash_ref(&kp));
}

#[test]
fn key_package_as_mls_message() {
    let dan = Client::new(DAN);
    let kp = dan.key_package(false);
    let bytes = ser(&om::MlsMessageOut::from(kp.clone()));
    let info = MlsMessageInfo::parse(&bytes).unwrap();
    assert_eq!(info.wire_format(), WireFormat::KeyPackage);
    assert_eq!(info.version(), MLS10);
    let MlsMessageInfo::KeyPackage(inner) = info else {
        panic!("expected a KeyPackage, got {info:?}");
    };
    assert_eq!(inner.identity(), DAN);
    assert_eq!(inner.key_package_ref(), dan.hash_ref(&kp));
    // The bare KeyPackage parser does not take the MLSMessage wrapper.
    assert!(KeyPackageInfo::parse(&bytes).is_err());
}

/// Offset of the first occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn tampered_key_package_is_refused() {
    let dan = Client::new(DAN);
    let kp = dan.key_package(false);
    let bytes = ser(&kp);

    // In the leaf node: the identity ("spiffe" -> "rpiffe").
    let mut leaf = bytes.clone();
    leaf[find(&bytes, DAN.as_bytes())] ^= 0x01;
    assert_eq!(
        KeyPackageInfo::parse(&leaf),
        Err(MlsWireError::BadSignature {
            what: "LeafNodeTBS"
        })
    );

    // In the KeyPackage but outside the leaf node: the init key (after
    // version, suite and its one-byte length).
    let mut init = bytes.clone();
    init[5] ^= 0x01;
    assert_eq!(
        KeyPackageInfo::parse(&init),
        Err(MlsWireError::BadSignature {
            what: "KeyPackageTBS"
        })
    );

    // The KeyPackage signature itself (the last 64 bytes).
    let mut sig = bytes.clone();
    let last = sig.len() - 1;
    sig[last] ^= 0x80;
    assert!(matches!(
        KeyPackageInfo::parse(&sig),
        Err(MlsWireError::BadSignature { .. })
    ));

    // Every single-bit flip anywhere is refused: the whole structure is
    // either signed or framing.
    for i in 0..bytes.len() {
        for bit in [0x01, 0x80] {
            let mut flipped = bytes.clone();
            flipped[i] ^= bit;
            assert!(
                KeyPackageInfo::parse(&flipped).is_err(),
                "flip {bit:#x} at {i} accepted"
            );
        }
    }
}

#[test]
fn key_package_truncated_at_every_length_is_refused() {
    let bytes = ser(&Client::new(DAN).key_package(true));
    for len in 0..bytes.len() {
        assert!(
            KeyPackageInfo::parse(&bytes[..len]).is_err(),
            "accepted {len} of {} bytes",
            bytes.len()
        );
    }
}

#[test]
fn key_package_with_trailing_bytes_is_refused() {
    let mut bytes = ser(&Client::new(DAN).key_package(false));
    bytes.push(0);
    assert_eq!(
        KeyPackageInfo::parse(&bytes),
        Err(MlsWireError::TrailingBytes { count: 1 })
    );
}

#[test]
fn key_package_wrong_version_or_suite_is_refused() {
    let bytes = ser(&Client::new(DAN).key_package(false));
    let mut version = bytes.clone();
    version[1] = 2;
    assert_eq!(
        KeyPackageInfo::parse(&version),
        Err(MlsWireError::UnsupportedVersion(2))
    );
    let mut suite = bytes.clone();
    suite[3] = 3;
    assert_eq!(
        KeyPackageInfo::parse(&suite),
        Err(MlsWireError::UnsupportedCipherSuite(3))
    );
}

// === Group messages from openmls ===

fn check_group_messages(policy: om::WireFormatPolicy, handshake: WireFormat) {
    let mut s = scenario(policy);
    let group_id = s.group.group_id().as_slice().to_vec();

    let commit = MlsMessageInfo::parse(&s.commit).unwrap();
    assert_eq!(commit.wire_format(), handshake);
    let (MlsMessageInfo::PublicMessage(framed) | MlsMessageInfo::PrivateMessage(framed)) = &commit
    else {
        panic!("expected a framed message, got {commit:?}");
    };
    assert_eq!(framed.group_id(), group_id);
    assert_eq!(framed.epoch(), s.epoch_before_commit);
    assert_eq!(framed.content_type(), ContentType::Commit);
    match handshake {
        WireFormat::PublicMessage => {
            assert_eq!(framed.sender(), Some(Sender::Member { leaf_index: 0 }));
        }
        _ => assert_eq!(framed.sender(), None),
    }

    let welcome = MlsMessageInfo::parse(&s.welcome).unwrap();
    assert_eq!(welcome.wire_format(), WireFormat::Welcome);
    let MlsMessageInfo::Welcome(w) = &welcome else {
        panic!("expected a Welcome, got {welcome:?}");
    };
    assert_eq!(w.cipher_suite(), SUPPORTED_CIPHER_SUITE);
    let mut got = w.new_members().to_vec();
    got.sort();
    let mut want = s.member_refs.clone();
    want.sort();
    assert_eq!(got, want);

    let app = s
        .group
        .create_message(&s.alice.provider, &s.alice.signer, b"referral")
        .unwrap();
    let app = MlsMessageInfo::parse(&ser(&app)).unwrap();
    assert_eq!(app.wire_format(), WireFormat::PrivateMessage);
    assert_eq!(app.group_id(), Some(group_id.as_slice()));
    assert_eq!(app.epoch(), Some(s.group.epoch().as_u64()));
    let MlsMessageInfo::PrivateMessage(app) = app else {
        panic!("expected a PrivateMessage");
    };
    assert_eq!(app.content_type(), ContentType::Application);
    assert_eq!(app.epoch(), s.epoch_before_commit + 1);

    // Proposals: a remove (fixed size) and a self-update (a LeafNode).
    let (remove, _) = s
        .group
        .propose_remove_member(
            &s.alice.provider,
            &s.alice.signer,
            om::LeafNodeIndex::new(2),
        )
        .unwrap();
    let remove = MlsMessageInfo::parse(&ser(&remove)).unwrap();
    assert_eq!(remove.wire_format(), handshake);
    let (update, _) = s
        .group
        .propose_self_update(
            &s.alice.provider,
            &s.alice.signer,
            om::LeafNodeParameters::default(),
        )
        .unwrap();
    let update = MlsMessageInfo::parse(&ser(&update)).unwrap();
    for proposal in [remove, update] {
        let (MlsMessageInfo::PublicMessage(p) | MlsMessageInfo::PrivateMessage(p)) = proposal
        else {
            panic!("expected a framed message");
        };
        assert_eq!(p.content_type(), ContentType::Proposal);
        assert_eq!(p.group_id(), group_id);
    }

    // A commit with an update path (it commits the pending proposals).
    let (path_commit, _, _) = s
        .group
        .commit_to_pending_proposals(&s.alice.provider, &s.alice.signer)
        .unwrap();
    let path_commit = MlsMessageInfo::parse(&ser(&path_commit)).unwrap();
    assert_eq!(path_commit.wire_format(), handshake);

    let group_info = s
        .group
        .export_group_info(s.alice.provider.crypto(), &s.alice.signer, true)
        .unwrap();
    let group_info = MlsMessageInfo::parse(&ser(&group_info)).unwrap();
    let MlsMessageInfo::GroupInfo(g) = group_info else {
        panic!("expected a GroupInfo");
    };
    assert_eq!(g.group_id(), group_id);
    assert_eq!(g.epoch(), s.group.epoch().as_u64());
    assert_eq!(g.cipher_suite(), SUPPORTED_CIPHER_SUITE);
    assert_eq!(g.signer(), 0);
}

#[test]
fn openmls_messages_with_default_policy() {
    // openmls 0.9 defaults to PURE_CIPHERTEXT: handshakes are PrivateMessages.
    assert_eq!(
        om::WireFormatPolicy::default(),
        om::PURE_CIPHERTEXT_WIRE_FORMAT_POLICY
    );
    check_group_messages(om::WireFormatPolicy::default(), WireFormat::PrivateMessage);
}

#[test]
fn openmls_messages_with_plaintext_handshakes() {
    check_group_messages(
        om::PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
        WireFormat::PublicMessage,
    );
}

#[test]
fn group_messages_truncated_at_every_length_are_refused() {
    for policy in [
        om::PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
        om::PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
    ] {
        let s = scenario(policy);
        for bytes in [&s.commit, &s.welcome] {
            MlsMessageInfo::parse(bytes).unwrap();
            for len in 0..bytes.len() {
                assert!(MlsMessageInfo::parse(&bytes[..len]).is_err());
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert_eq!(
                MlsMessageInfo::parse(&trailing),
                Err(MlsWireError::TrailingBytes { count: 1 })
            );
        }
    }
}

#[test]
fn mls_message_header_is_checked() {
    let s = scenario(om::PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    let mut version = s.commit.clone();
    version[1] = 7;
    assert_eq!(
        MlsMessageInfo::parse(&version),
        Err(MlsWireError::UnsupportedVersion(7))
    );
    let mut wire_format = s.commit.clone();
    wire_format[3] = 6;
    assert_eq!(
        MlsMessageInfo::parse(&wire_format),
        Err(MlsWireError::UnknownWireFormat(6))
    );
    let mut suite = s.welcome.clone();
    suite[5] = 2;
    assert_eq!(
        MlsMessageInfo::parse(&suite),
        Err(MlsWireError::UnsupportedCipherSuite(2))
    );
}

#[test]
fn plaintext_application_message_is_refused() {
    // version, wire format public_message, group id "g", epoch 1, sender
    // member 0, no authenticated data, content type application, data "x".
    let mut bytes = vec![0, 1, 0, 1, 1, b'g'];
    bytes.extend_from_slice(&1u64.to_be_bytes());
    bytes.extend_from_slice(&[1, 0, 0, 0, 0, 0, 1, 1, b'x', 0, 0]);
    assert_eq!(
        MlsMessageInfo::parse(&bytes),
        Err(MlsWireError::PlaintextApplicationMessage)
    );
}

#[test]
fn welcome_limits() {
    // No recipients.
    let empty = [0, 1, 0, 3, 0, 1, 0, 0];
    assert_eq!(
        MlsMessageInfo::parse(&empty),
        Err(MlsWireError::EmptyWelcome)
    );
    // A KeyPackageRef of the wrong length.
    let short_ref = [0, 1, 0, 3, 0, 1, 4, 2, 0xaa, 0, 0, 0];
    assert!(matches!(
        MlsMessageInfo::parse(&short_ref),
        Err(MlsWireError::InvalidLength { .. })
    ));
    // More recipients than MAX_WELCOME_SECRETS.
    let mut secrets = Vec::new();
    for _ in 0..=MAX_WELCOME_SECRETS {
        write_opaque(&mut secrets, &[7; 32]).unwrap();
        secrets.extend_from_slice(&[0, 0]);
    }
    let mut many = vec![0, 1, 0, 3, 0, 1];
    write_opaque(&mut many, &secrets).unwrap();
    many.push(0);
    assert_eq!(
        MlsMessageInfo::parse(&many),
        Err(MlsWireError::TooMany {
            field: "Welcome.secrets",
            max: MAX_WELCOME_SECRETS
        })
    );
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let big = vec![0u8; MAX_MESSAGE_LEN + 1];
    assert!(matches!(
        MlsMessageInfo::parse(&big),
        Err(MlsWireError::TooLarge { .. })
    ));
    assert!(matches!(
        KeyPackageInfo::parse(&big),
        Err(MlsWireError::TooLarge { .. })
    ));
}

// === Variable-length integers ===

#[test]
fn varint_table() {
    let ok: &[(&[u8], usize)] = &[
        (&[0x00], 0),
        (&[0x3f], 63),
        (&[0x40, 0x40], 64),
        (&[0x7f, 0xff], 16383),
        (&[0x80, 0x00, 0x40, 0x00], 16384),
        (&[0xbf, 0xff, 0xff, 0xff], (1 << 30) - 1),
    ];
    for (bytes, want) in ok {
        let mut r = Reader::new(bytes);
        assert_eq!(r.varint("v"), Ok(*want), "{bytes:02x?}");
        assert!(r.finish().is_ok());
    }
    let bad: &[(&[u8], MlsWireError)] = &[
        (&[], MlsWireError::Truncated { field: "v" }),
        (&[0x40], MlsWireError::Truncated { field: "v" }),
        (&[0x80, 0, 0], MlsWireError::Truncated { field: "v" }),
        // Not minimal.
        (&[0x40, 0x3f], MlsWireError::InvalidVarint { field: "v" }),
        (
            &[0x80, 0x00, 0x3f, 0xff],
            MlsWireError::InvalidVarint { field: "v" },
        ),
        // Reserved prefix.
        (
            &[0xc0, 0, 0, 0, 0, 0, 0, 1],
            MlsWireError::InvalidVarint { field: "v" },
        ),
    ];
    for (bytes, want) in bad {
        assert_eq!(
            Reader::new(bytes).varint("v"),
            Err(want.clone()),
            "{bytes:02x?}"
        );
    }
    for len in [0usize, 1, 63, 64, 16383, 16384, 100_000] {
        let value = vec![9u8; len];
        let mut out = Vec::new();
        write_opaque(&mut out, &value).unwrap();
        let mut r = Reader::new(&out);
        assert_eq!(r.opaque("v"), Ok(value.as_slice()));
        assert!(r.finish().is_ok());
    }
}

#[test]
fn opaque_longer_than_input_is_truncated() {
    assert_eq!(
        Reader::new(&[0x05, 1, 2]).opaque("v"),
        Err(MlsWireError::Truncated { field: "v" })
    );
}

// === Hand-built KeyPackages ===

/// A KeyPackage built field by field and signed with ed25519-dalek, to
/// reach cases openmls will not produce.
#[derive(Clone)]
struct RawKeyPackage {
    version: u16,
    suite: u16,
    init_key: Vec<u8>,
    encryption_key: Vec<u8>,
    signature_key: Option<Vec<u8>>,
    credential_type: u16,
    identity: Vec<u8>,
    source: u8,
    lifetime: (u64, u64),
    leaf_extensions: Vec<(u16, Vec<u8>)>,
    extensions: Vec<(u16, Vec<u8>)>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl RawKeyPackage {
    fn valid() -> Self {
        Self {
            version: 1,
            suite: 1,
            init_key: vec![1; 32],
            encryption_key: vec![2; 32],
            signature_key: None,
            credential_type: 1,
            identity: DAN.as_bytes().to_vec(),
            source: 1,
            lifetime: (now() - 3600, now() + 86_400),
            leaf_extensions: Vec::new(),
            extensions: Vec::new(),
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    fn sign(label: &str, content: &[u8]) -> Vec<u8> {
        let mut sign_content = Vec::new();
        write_opaque(&mut sign_content, format!("MLS 1.0 {label}").as_bytes()).unwrap();
        write_opaque(&mut sign_content, content).unwrap();
        Self::key().sign(&sign_content).to_bytes().to_vec()
    }

    fn extensions(out: &mut Vec<u8>, extensions: &[(u16, Vec<u8>)]) {
        let mut list = Vec::new();
        for (extension_type, data) in extensions {
            list.extend_from_slice(&extension_type.to_be_bytes());
            write_opaque(&mut list, data).unwrap();
        }
        write_opaque(out, &list).unwrap();
    }

    fn to_bytes(&self) -> Vec<u8> {
        let signature_key = self
            .signature_key
            .clone()
            .unwrap_or_else(|| Self::key().verifying_key().to_bytes().to_vec());
        let mut leaf = Vec::new();
        write_opaque(&mut leaf, &self.encryption_key).unwrap();
        write_opaque(&mut leaf, &signature_key).unwrap();
        leaf.extend_from_slice(&self.credential_type.to_be_bytes());
        if self.credential_type == 2 {
            let mut certs = Vec::new();
            write_opaque(&mut certs, &self.identity).unwrap();
            write_opaque(&mut leaf, &certs).unwrap();
        } else {
            write_opaque(&mut leaf, &self.identity).unwrap();
        }
        // Capabilities: versions [mls10], suites [1], no extensions, no
        // proposals, credentials [basic].
        leaf.extend_from_slice(&[2, 0, 1, 2, 0, 1, 0, 0, 2, 0, 1]);
        leaf.push(self.source);
        match self.source {
            1 => {
                leaf.extend_from_slice(&self.lifetime.0.to_be_bytes());
                leaf.extend_from_slice(&self.lifetime.1.to_be_bytes());
            }
            3 => write_opaque(&mut leaf, &[0; 32]).unwrap(),
            _ => {}
        }
        Self::extensions(&mut leaf, &self.leaf_extensions);
        let leaf_signature = Self::sign("LeafNodeTBS", &leaf);
        write_opaque(&mut leaf, &leaf_signature).unwrap();

        let mut kp = Vec::new();
        kp.extend_from_slice(&self.version.to_be_bytes());
        kp.extend_from_slice(&self.suite.to_be_bytes());
        write_opaque(&mut kp, &self.init_key).unwrap();
        kp.extend_from_slice(&leaf);
        Self::extensions(&mut kp, &self.extensions);
        let signature = Self::sign("KeyPackageTBS", &kp);
        write_opaque(&mut kp, &signature).unwrap();
        kp
    }
}

#[test]
fn hand_built_key_package_agrees_with_openmls() {
    let raw = RawKeyPackage::valid();
    let bytes = raw.to_bytes();
    let info = KeyPackageInfo::parse(&bytes).unwrap();
    assert_eq!(info.identity(), DAN);
    assert_eq!(info.lifetime().not_before, raw.lifetime.0);

    // openmls reads and validates the same bytes and computes the same ref.
    let provider = OpenMlsRustCrypto::default();
    let kp = om::KeyPackageIn::tls_deserialize_exact(&bytes)
        .unwrap()
        .validate(provider.crypto(), om::ProtocolVersion::Mls10)
        .unwrap();
    let want = kp.hash_ref(provider.crypto()).unwrap();
    assert_eq!(
        info.key_package_ref().as_bytes().as_slice(),
        want.as_slice()
    );
}

#[test]
fn hand_built_key_package_table() {
    type Edit = fn(&mut RawKeyPackage);
    let cases: &[(&str, Edit, Result<(), MlsWireError>)] = &[
        ("valid", |_| {}, Ok(())),
        (
            "x509 credential",
            |k| k.credential_type = 2,
            Err(MlsWireError::UnsupportedCredential(2)),
        ),
        (
            "unknown credential",
            |k| k.credential_type = 9,
            Err(MlsWireError::UnsupportedCredential(9)),
        ),
        (
            "identity not UTF-8",
            |k| k.identity = vec![0xff, 0xfe],
            Err(MlsWireError::InvalidUtf8),
        ),
        (
            "leaf source update",
            |k| k.source = 2,
            Err(MlsWireError::WrongLeafNodeSource(2)),
        ),
        (
            "leaf source commit",
            |k| k.source = 3,
            Err(MlsWireError::WrongLeafNodeSource(3)),
        ),
        (
            "leaf source reserved",
            |k| k.source = 0,
            Err(MlsWireError::InvalidValue {
                field: "LeafNode.leaf_node_source",
                value: 0,
            }),
        ),
        (
            "init key reused as encryption key",
            |k| k.init_key = k.encryption_key.clone(),
            Err(MlsWireError::InitKeyReused),
        ),
        (
            "short init key",
            |k| k.init_key = vec![1; 31],
            Err(MlsWireError::InvalidLength {
                field: "KeyPackage.init_key",
                len: 31,
                expected: 32,
            }),
        ),
        (
            "long signature key",
            |k| k.signature_key = Some(vec![1; 33]),
            Err(MlsWireError::InvalidLength {
                field: "LeafNode.signature_key",
                len: 33,
                expected: 32,
            }),
        ),
        (
            "signature key of someone else",
            |k| {
                k.signature_key = Some(
                    SigningKey::from_bytes(&[7; 32])
                        .verifying_key()
                        .to_bytes()
                        .to_vec(),
                )
            },
            Err(MlsWireError::BadSignature {
                what: "LeafNodeTBS",
            }),
        ),
        (
            "duplicate extension",
            |k| k.extensions = vec![(0x000A, vec![]), (0x000A, vec![])],
            Err(MlsWireError::DuplicateExtension(0x000A)),
        ),
        (
            "duplicate leaf extension",
            |k| k.leaf_extensions = vec![(0xF000, vec![1]), (0xF000, vec![2])],
            Err(MlsWireError::DuplicateExtension(0xF000)),
        ),
        (
            "too many extensions",
            |k| {
                k.extensions = (0..=MAX_EXTENSIONS as u16)
                    .map(|t| (0xF000 + t, vec![]))
                    .collect()
            },
            Err(MlsWireError::TooMany {
                field: "KeyPackage.extensions",
                max: MAX_EXTENSIONS,
            }),
        ),
        (
            "version",
            |k| k.version = 0x0100,
            Err(MlsWireError::UnsupportedVersion(0x0100)),
        ),
        (
            "suite",
            |k| k.suite = 0x0002,
            Err(MlsWireError::UnsupportedCipherSuite(2)),
        ),
    ];
    for (name, edit, want) in cases {
        let mut raw = RawKeyPackage::valid();
        edit(&mut raw);
        let got = KeyPackageInfo::parse(&raw.to_bytes()).map(|_| ());
        assert_eq!(&got, want, "{name}");
    }

    let mut raw = RawKeyPackage::valid();
    raw.extensions = vec![(0xF001, vec![1, 2]), (0x000A, vec![])];
    assert!(KeyPackageInfo::parse(&raw.to_bytes())
        .unwrap()
        .is_last_resort());
    raw.extensions = vec![];
    raw.leaf_extensions = vec![(0x000A, vec![])];
    // last_resort counts only among the KeyPackage's own extensions.
    assert!(!KeyPackageInfo::parse(&raw.to_bytes())
        .unwrap()
        .is_last_resort());
}

#[test]
fn lifetime_contains_is_inclusive() {
    let l = Lifetime {
        not_before: 10,
        not_after: 20,
    };
    assert!(!l.contains(9));
    assert!(l.contains(10));
    assert!(l.contains(20));
    assert!(!l.contains(21));
}

#[test]
fn key_package_ref_display_and_conversion() {
    let r = KeyPackageRef::from_bytes([0xab; 32]);
    assert_eq!(r.to_string(), "ab".repeat(32));
    assert_eq!(KeyPackageRef::try_from(&[0xab; 32][..]), Ok(r));
    assert!(KeyPackageRef::try_from(&[0xab; 31][..]).is_err());
}

// === No panic on anything ===

/// xorshift64*: a deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn parse_both(bytes: &[u8]) {
    let _ = MlsMessageInfo::parse(bytes);
    let _ = KeyPackageInfo::parse(bytes);
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let len = bytes.len().max(1);
        match rng.below(6) {
            0 => {
                if let Some(b) = bytes.get_mut(rng.below(len)) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                if let Some(b) = bytes.get_mut(rng.below(len)) {
                    *b = [0x00, 0x3f, 0x40, 0x7f, 0x80, 0xbf, 0xc0, 0xff][rng.below(8)];
                }
            }
            2 => {
                let at = rng.below(len);
                bytes.insert(at.min(bytes.len()), rng.next() as u8);
            }
            3 => {
                if !bytes.is_empty() {
                    bytes.remove(rng.below(bytes.len()));
                }
            }
            4 => bytes.truncate(rng.below(len)),
            _ => {
                // Splice a chunk from elsewhere in the message.
                let a = rng.below(len);
                let b = rng.below(len);
                let (from, to) = (a.min(b), a.max(b).min(bytes.len()));
                let chunk = bytes[from.min(to)..to].to_vec();
                let at = rng.below(len).min(bytes.len());
                bytes.splice(at..at, chunk);
            }
        }
    }
    bytes
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x5EED_5AFE);
    for _ in 0..20_000 {
        let len = rng.below(300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Give half of them a valid MLSMessage header to get further in.
        if rng.below(2) == 0 && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&[0, 1, 0, 1 + rng.below(5) as u8]);
        }
        parse_both(&bytes);
    }
}

#[test]
fn mutated_messages_never_panic() {
    let plain = scenario(om::PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    let mut cipher = scenario(om::PURE_CIPHERTEXT_WIRE_FORMAT_POLICY);
    let app = cipher
        .group
        .create_message(&cipher.alice.provider, &cipher.alice.signer, b"referral")
        .unwrap();
    let group_info = plain
        .group
        .export_group_info(plain.alice.provider.crypto(), &plain.alice.signer, true)
        .unwrap();
    let kp = Client::new(DAN).key_package(true);
    let seeds = [
        plain.commit.clone(),
        plain.welcome.clone(),
        cipher.commit.clone(),
        ser(&app),
        ser(&group_info),
        ser(&kp),
        ser(&om::MlsMessageOut::from(kp)),
        RawKeyPackage::valid().to_bytes(),
    ];
    for seed in &seeds {
        assert!(
            MlsMessageInfo::parse(seed).is_ok() || KeyPackageInfo::parse(seed).is_ok(),
            "seed does not parse"
        );
    }
    let mut rng = Rng(0xC0FFEE);
    for i in 0..20_000 {
        let seed = &seeds[i % seeds.len()];
        parse_both(&mutate(&mut rng, seed));
    }
}

#[test]
fn a_group_id_names_its_home_area() {
    let home = crate::AreaId::new("northshire").unwrap();
    let id = group_id_with_home(&home, &[7u8; 16]);
    assert_eq!(home_of_group(&id), Some(home.clone()));
    // Random group ids (from before homes were named) name none, nor do
    // ids that only look like one.
    assert_eq!(home_of_group(&[0x5a; 32]), None);
    assert_eq!(home_of_group(b"home/northshire/short"), None);
    assert_eq!(home_of_group(b"home/North Shire/0123456789abcdef"), None);
    assert_eq!(home_of_group(b"home/"), None);
    assert_eq!(home_of_group(b""), None);
}

/// A commit proof holds only for its group, epoch and content, under the
/// key it was made with, and names a next key only its maker holds; one of
/// bad form is refused with an error, never a panic.
#[test]
fn commit_proofs_hold_only_for_what_they_were_made_for() {
    let hash = crate::ContentHash([4; 32]);
    let proof = crate::CommitProof::make(&[1; 32], &[2; 32], "ab", 7, &hash);
    let key = epoch_key(&[1; 32]).verifying_key().to_bytes();
    let next = epoch_key(&[2; 32]).verifying_key().to_bytes();
    assert_eq!(proof.verify(&key, "ab", 7, &hash), Ok(next));
    assert_eq!(proof.next_key("ab", 7, &hash), Ok(next));
    for (group, epoch, hash, key) in [
        ("ac", 7, hash, key),
        ("ab", 8, hash, key),
        ("ab", 7, crate::ContentHash([5; 32]), key),
        ("ab", 7, hash, next),
    ] {
        assert!(proof.verify(&key, group, epoch, &hash).is_err());
    }
    assert_eq!(
        proof.verify(&next, "ab", 7, &hash),
        Err(ProofError::BadSignature)
    );
    // A key its maker does not hold (a member removed by the Commit naming
    // one of her own, signed with the epoch's key she still has): refused.
    let mut swapped = crate::CommitProof::make(&[1; 32], &[3; 32], "ab", 7, &hash);
    swapped.next_epoch_key = proof.next_epoch_key.clone();
    assert_eq!(
        swapped.next_key("ab", 7, &hash),
        Err(ProofError::NextKeyUnproven)
    );
    let mut named = proof.clone();
    named.next_epoch_key = hex::encode(epoch_key(&[3; 32]).verifying_key().to_bytes());
    assert!(named.verify(&key, "ab", 7, &hash).is_err());
    let bad = |signature: &str, next: &str, next_signature: &str| crate::CommitProof {
        signature: signature.into(),
        next_epoch_key: next.into(),
        next_epoch_signature: next_signature.into(),
    };
    let (sig, next, next_sig) = (
        proof.signature.as_str(),
        proof.next_epoch_key.as_str(),
        proof.next_epoch_signature.as_str(),
    );
    for p in [
        bad("zz", next, next_sig),
        bad(&sig[2..], next, next_sig),
        bad(&format!("{sig}00"), next, next_sig),
        bad(sig, &next[2..], next_sig),
        bad(sig, "not hex at all", next_sig),
        bad(sig, next, &next_sig[1..]),
        bad("", "", ""),
    ] {
        assert!(
            matches!(p.next_key("ab", 7, &hash), Err(ProofError::Malformed(_))),
            "{p:?}"
        );
        assert!(
            matches!(
                p.verify(&key, "ab", 7, &hash),
                Err(ProofError::Malformed(_))
            ),
            "{p:?}"
        );
    }
}
